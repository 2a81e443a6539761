//! The iPXE flavour, the default: templates `*.tmpl` in iPXE script
//! (`#!ipxe`). iPXE has no quoting, so text it prints goes through
//! [`echo_safe`], and values on its command lines through the `ipxe`
//! filter of [`crate::render`]. iPXE does not run the body of an error
//! status, so error answers are plain text.

use super::Flavour;

pub struct Ipxe;

impl Flavour for Ipxe {
    fn name(&self) -> &'static str {
        "ipxe"
    }

    fn extension(&self) -> &'static str {
        "tmpl"
    }

    fn refusal(&self, lines: &[String], delay: u32) -> String {
        let mut s =
            String::from("#!ipxe\necho\necho KIWIspray cannot boot this machine as asked:\n");
        for l in lines {
            s.push_str(&format!("echo   {}\n", echo_safe(l)));
        }
        s.push_str(&format!(
            "echo Rebooting in {delay} seconds.\nsleep {delay}\nreboot\n"
        ));
        s
    }

    fn retry_later(&self, lines: &[String], seconds: u64) -> String {
        let mut s = String::from("#!ipxe\n");
        for l in lines {
            s.push_str(&format!("echo {}\n", echo_safe(l)));
        }
        s.push_str(&format!(
            "sleep {seconds}\nchain --autofree bootstrap.ipxe || reboot\n"
        ));
        s
    }

    fn error_body(&self, reason: &str) -> String {
        format!("kiwispray: {reason}\n")
    }
}

/// Text that iPXE's `echo` prints as it is: no setting expansion, no
/// `&&`/`||` that would chain a command, no control characters.
pub fn echo_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect::<String>()
        .replace("${", "$ {")
        .replace("&&", "& &")
        .replace("||", "| |")
}
