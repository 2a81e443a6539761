/* Boot sector of the e2e test image: prints a marker line on COM1 (0x3F8)
   and halts, so a guest booting its local disk is visible in the serial log. */
    .code16
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw $msg, %si
    cld
next:
    lodsb
    testb %al, %al
    jz halt
    movb %al, %bl
wait:
    movw $0x3fd, %dx        /* line status register */
    inb %dx, %al
    testb $0x20, %al        /* transmit holding register empty? */
    jz wait
    movw $0x3f8, %dx
    movb %bl, %al
    outb %al, %dx
    jmp next
halt:
    hlt
    jmp halt
msg:
    .ascii "\r\nKIWISPRAY-E2E-LOCAL-DISK-BOOTED (bios)\r\n\0"
