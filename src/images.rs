//! Importing KIWI images into a deployment root: recognising the files of
//! an oem PXE build (all three naming generations KIWI has used), verifying
//! the image against its checksum file, and writing the `host.tmpl` that
//! boots the installer; and the same for live ISOs. The CLI calls
//! [`import_image`] and [`import_live_iso`]; `kiwispray-hosts check` uses
//! [`Checksum`] and [`verify_image`].
//!
//! An import is built in a hidden directory inside `images/` (which the web
//! server does not serve) and renamed into place only when everything is
//! there and verified, so a failed import leaves nothing behind and a booting
//! machine never sees half an image. External tools do the heavy lifting:
//! `tar` unpacks, `xz` decompresses, `sha256sum`/`sha512sum`/`md5sum` hash,
//! `xorriso` reads ISOs.
//!
//! The import also reads the installer initrd's `/.profile` (its cpio
//! archives are parsed here, the compressed one through the system's `xz`,
//! `gzip`, `zstd`, `bzip2` or `lz4`): an installer without
//! `kiwi_oemunattended='true'` asks before it writes the disk. The finding
//! goes to `image.json` ([`ImageInfo`]) for `check`, and the generated
//! `host.tmpl` passes `rd.kiwi.oem.installdevice=` to hosts whose metadata
//! names their disk.

use std::fmt;
use std::fs;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why an import failed. The kind tells the CLI which exit code to use.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportError {
    /// The source is not a usable build (missing files, bad checksum, ...).
    Invalid(String),
    /// The source does not exist.
    NotFound(String),
    /// The image exists and `--force` was not given.
    Exists(String),
    /// Reading, writing or running a tool failed.
    Io(String),
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportError::Invalid(m)
            | ImportError::NotFound(m)
            | ImportError::Exists(m)
            | ImportError::Io(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ImportError {}

fn io_err(action: impl fmt::Display, e: impl fmt::Display) -> ImportError {
    ImportError::Io(format!("{action}: {e}"))
}

/// The naming generation of a KIWI PXE build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// Before v9.18.18: `pxeboot.kernel`, `pxeboot.initrd.xz`, `<name>.md5`.
    Bare,
    /// v9.18.18 to v9.24.10: `pxeboot.<P>.kernel`, `pxeboot.<P>.initrd.xz`.
    XzInitrd,
    /// v9.24.11 and later: `pxeboot.<P>.initrd`, `<P>.config.bootoptions`.
    Current,
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Generation::Bare => "naming of kiwi before v9.18.18, pxeboot.initrd.xz",
            Generation::XzInitrd => "naming of kiwi v9.18.18 to v9.24.10, pxeboot.<P>.initrd.xz",
            Generation::Current => "naming of kiwi v9.24.11 and later, pxeboot.<P>.initrd",
        })
    }
}

/// The files of one KIWI oem PXE build, by their names in the build.
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    pub generation: Generation,
    /// `<P>`: `<name>.<arch>-<version>`, or the bare image name.
    pub prefix: String,
    /// `<P>.xz`.
    pub image: String,
    /// `<P>.sha256`, `<P>.sha512` or `<P>.md5`.
    pub checksum: String,
    /// `<P>.append`.
    pub append: String,
    /// The kernel iPXE boots.
    pub installer_kernel: String,
    /// The initrd iPXE boots.
    pub installer_initrd: String,
    /// `<P>.initrd`: the installed system's initrd.
    pub system_initrd: String,
    /// `<P>.config.bootoptions`, where the build has one.
    pub bootoptions: Option<String>,
}

impl Build {
    /// Recognises a build among the file names of a directory.
    pub fn detect(names: &[String]) -> Result<Build, String> {
        let has = |n: &str| names.iter().any(|x| x == n);
        let mut appends: Vec<&String> = names.iter().filter(|n| n.ends_with(".append")).collect();
        appends.sort();
        let append = match appends.as_slice() {
            [] => {
                return Err("no <name>.append file: this is not a KIWI oem PXE build \
                            (expected the contents of a *.install.tar)"
                    .into())
            }
            [one] => (*one).clone(),
            many => {
                return Err(format!(
                    "several .append files ({}); import one build at a time",
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        };
        let prefix = append.trim_end_matches(".append").to_string();
        check_prefix(&prefix)?;
        let image = format!("{prefix}.xz");
        if !has(&image) {
            return Err(format!(
                "{append} is there but the image {image} is missing"
            ));
        }
        let checksum = ["sha512", "sha256", "md5"]
            .iter()
            .map(|ext| format!("{prefix}.{ext}"))
            .find(|n| has(n))
            .ok_or_else(|| {
                format!("no checksum file for {image} ({prefix}.sha256, .sha512 or .md5)")
            })?;
        let (generation, installer_initrd) = if has(&format!("pxeboot.{prefix}.initrd")) {
            (Generation::Current, format!("pxeboot.{prefix}.initrd"))
        } else if has(&format!("pxeboot.{prefix}.initrd.xz")) {
            (Generation::XzInitrd, format!("pxeboot.{prefix}.initrd.xz"))
        } else if has("pxeboot.initrd.xz") {
            (Generation::Bare, "pxeboot.initrd.xz".to_string())
        } else {
            return Err(format!(
                "no installer initrd (pxeboot.{prefix}.initrd, pxeboot.{prefix}.initrd.xz \
                 or pxeboot.initrd.xz)"
            ));
        };
        let installer_kernel = [
            format!("pxeboot.{prefix}.kernel"),
            "pxeboot.kernel".to_string(),
        ]
        .into_iter()
        .find(|n| has(n))
        .ok_or_else(|| {
            format!("no installer kernel (pxeboot.{prefix}.kernel or pxeboot.kernel)")
        })?;
        let system_initrd = format!("{prefix}.initrd");
        if !has(&system_initrd) {
            return Err(format!(
                "{system_initrd} is missing: the installer fetches it to boot the installed system"
            ));
        }
        let bootoptions = format!("{prefix}.config.bootoptions");
        let bootoptions = if has(&bootoptions) {
            Some(bootoptions)
        } else if generation == Generation::Current {
            return Err(format!(
                "{bootoptions} is missing: the installer of this kiwi version requires it"
            ));
        } else {
            None
        };
        Ok(Build {
            generation,
            prefix,
            image,
            checksum,
            append,
            installer_kernel,
            installer_initrd,
            system_initrd,
            bootoptions,
        })
    }

    /// The files copied into the image directory (the `<P>.kernel` symlink
    /// is made anew).
    pub fn files(&self) -> Vec<&str> {
        let mut v = vec![
            self.image.as_str(),
            &self.checksum,
            &self.append,
            &self.installer_kernel,
            &self.installer_initrd,
            &self.system_initrd,
        ];
        if let Some(b) = &self.bootoptions {
            v.push(b);
        }
        v
    }
}

/// `<P>` ends up in URLs and in a template: one safe file-name component
/// without `.xz` (the installer replaces every `.xz` of the image URL).
fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && !prefix.starts_with('.')
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'));
    if !ok {
        return Err(format!(
            "build name {prefix:?} has characters that cannot go into a URL as they are"
        ));
    }
    if prefix.contains(".xz") {
        return Err(format!(
            "build name {prefix:?} contains \".xz\"; the installer would derive wrong file names from its URL"
        ));
    }
    Ok(())
}

/// Checks the name of an image state for import: a safe state name that
/// can be part of a URL and of a template.
pub fn check_image_name(name: &str) -> Result<(), String> {
    crate::lifecycle::check_state_name(name)?;
    if matches!(name, "new" | "finished") {
        return Err(format!("{name:?} is a built-in state, not an image name"));
    }
    if name.contains('@') {
        return Err(format!(
            "image name {name:?} must not contain '@' (templates use it)"
        ));
    }
    if name.contains(".xz") {
        return Err(format!(
            "image name {name:?} contains \".xz\"; the installer would derive wrong URLs from it"
        ));
    }
    Ok(())
}

/// Digest algorithms of KIWI checksum files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
    Sha512,
}

impl Algorithm {
    fn tool(self) -> &'static str {
        match self {
            Algorithm::Md5 => "md5sum",
            Algorithm::Sha256 => "sha256sum",
            Algorithm::Sha512 => "sha512sum",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A KIWI checksum file: `<hexdigest> <blocks> <blocksize>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Checksum {
    pub algorithm: Algorithm,
    pub digest: String,
    /// `blocks * blocksize`: the size of the uncompressed image.
    pub size: Option<u64>,
}

impl Checksum {
    /// Parses a checksum file; the algorithm comes from the file name's
    /// extension (`.md5`, `.sha256`, `.sha512`).
    pub fn parse(file_name: &str, text: &str) -> Result<Checksum, String> {
        let algorithm = if file_name.ends_with(".sha512") {
            Algorithm::Sha512
        } else if file_name.ends_with(".sha256") {
            Algorithm::Sha256
        } else if file_name.ends_with(".md5") {
            Algorithm::Md5
        } else {
            return Err(format!("{file_name}: not a .md5, .sha256 or .sha512 file"));
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        let digest = words
            .first()
            .ok_or_else(|| format!("{file_name} is empty"))?
            .to_ascii_lowercase();
        if digest.len() != algorithm.hex_len() || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{file_name}: {:?} is not a {}-digit hex digest",
                digest.chars().take(140).collect::<String>(),
                algorithm.hex_len()
            ));
        }
        let size = match words.get(1..3) {
            Some([blocks, blocksize]) => {
                let b: u64 = blocks
                    .parse()
                    .map_err(|_| format!("{file_name}: block count {blocks:?} is not a number"))?;
                let s: u64 = blocksize.parse().map_err(|_| {
                    format!("{file_name}: block size {blocksize:?} is not a number")
                })?;
                Some(
                    b.checked_mul(s)
                        .ok_or_else(|| format!("{file_name}: {b} blocks of {s} bytes overflow"))?,
                )
            }
            _ => None,
        };
        Ok(Checksum {
            algorithm,
            digest,
            size,
        })
    }
}

/// Progress of a long copy on stderr, shown only when stderr is a terminal.
pub struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    enabled: bool,
    last: Instant,
}

/// Files smaller than this get no progress line.
const PROGRESS_THRESHOLD: u64 = 32 << 20;

impl Progress {
    pub fn new(label: impl Into<String>, total: Option<u64>, wanted: bool) -> Progress {
        let enabled =
            wanted && total.is_none_or(|t| t >= PROGRESS_THRESHOLD) && io::stderr().is_terminal();
        Progress {
            label: label.into(),
            total,
            done: 0,
            enabled,
            last: Instant::now(),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.enabled && self.last.elapsed() >= Duration::from_millis(250) {
            self.last = Instant::now();
            self.draw();
        }
    }

    fn draw(&self) {
        let mib = self.done >> 20;
        let line = match self.total {
            Some(t) if t > 0 => format!(
                "{}: {mib} of {} MiB ({}%)",
                self.label,
                t >> 20,
                self.done.min(t) * 100 / t
            ),
            _ => format!("{}: {mib} MiB", self.label),
        };
        eprint!("\r{line}\x1b[K");
    }

    pub fn finish(&self) {
        if self.enabled {
            self.draw();
            eprintln!();
        }
    }
}

/// Copies `r` to `w`, counting and showing progress.
fn pump(r: &mut dyn Read, w: &mut dyn Write, progress: &mut Progress) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
        progress.add(n as u64);
    }
    progress.finish();
    Ok(total)
}

fn spawn(cmd: &mut Command, what: &str) -> Result<std::process::Child, ImportError> {
    cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ImportError::Io(format!(
                "cannot run {what}: it is not installed (Debian package {})",
                match what {
                    "xz" => "xz-utils",
                    "tar" => "tar",
                    "xorriso" => "xorriso",
                    _ => "coreutils",
                }
            ))
        } else {
            io_err(format!("cannot run {what}"), e)
        }
    })
}

fn read_stderr(child: &mut std::process::Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Decompresses `image` (an `.xz` file) and checks its digest and size
/// against `sum`. Returns the uncompressed size.
pub fn verify_image(image: &Path, sum: &Checksum, progress: bool) -> Result<u64, ImportError> {
    let shown = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut xz = spawn(
        Command::new("xz")
            .arg("-dc")
            .arg("--")
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "xz",
    )?;
    let tool = sum.algorithm.tool();
    let mut hasher = match spawn(
        Command::new(tool)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        tool,
    ) {
        Ok(h) => h,
        Err(e) => {
            let _ = xz.kill();
            let _ = xz.wait();
            return Err(e);
        }
    };
    let mut p = Progress::new(format!("verifying {shown}"), sum.size, progress);
    let copied = {
        let mut out = xz.stdout.take().expect("piped");
        let mut input = hasher.stdin.take().expect("piped");
        pump(&mut out, &mut input, &mut p)
        // Both pipes close here, so the hasher sees the end of its input.
    };
    let xz_err = read_stderr(&mut xz);
    let xz_status = xz.wait().map_err(|e| io_err("waiting for xz", e))?;
    let mut hex = String::new();
    if let Some(mut o) = hasher.stdout.take() {
        let _ = o.read_to_string(&mut hex);
    }
    let hasher_status = hasher
        .wait()
        .map_err(|e| io_err(format!("waiting for {tool}"), e))?;
    let size = copied.map_err(|e| io_err(format!("decompressing {}", image.display()), e))?;
    if !xz_status.success() {
        return Err(ImportError::Invalid(format!(
            "{} does not decompress: {}",
            image.display(),
            if xz_err.is_empty() {
                "xz failed"
            } else {
                &xz_err
            }
        )));
    }
    if !hasher_status.success() {
        return Err(ImportError::Io(format!(
            "{tool} failed on {}",
            image.display()
        )));
    }
    let digest = hex
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if digest != sum.digest {
        return Err(ImportError::Invalid(format!(
            "checksum mismatch for {}: the uncompressed image has {tool} {digest}, the checksum file says {}",
            image.display(),
            sum.digest
        )));
    }
    if let Some(expected) = sum.size {
        if expected != size {
            return Err(ImportError::Invalid(format!(
                "size mismatch for {}: the uncompressed image is {size} bytes, the checksum file says {expected} (blocks × blocksize)",
                image.display()
            )));
        }
    }
    Ok(size)
}

/// Turns the build's `.append` line into the installer's kernel arguments:
/// the placeholder image URL replaced by the real one, and what KIWIspray
/// needs added.
pub fn kernel_args(append: &str, image_url: &str, initrd: &str) -> Result<String, String> {
    let mut args: Vec<String> = Vec::new();
    for word in append.split_whitespace() {
        if word.contains("${") || word == "||" || word == "&&" {
            return Err(format!(
                "the .append line has {word:?}, which iPXE would interpret; edit the build's kernelcmdline"
            ));
        }
        let key = word.split('=').next().unwrap_or("");
        if matches!(
            key,
            "rd.kiwi.install.image"
                | "initrd"
                | "BOOTIF"
                | "razorurl"
                | "rd.kiwi.install.pass.bootparam"
        ) {
            continue;
        }
        if !args.iter().any(|a| a == word) {
            args.push(word.to_string());
        }
    }
    if !args.iter().any(|a| a == "rd.kiwi.install.pxe") {
        args.insert(0, "rd.kiwi.install.pxe".into());
    }
    let mut out = vec![format!("initrd={initrd}")];
    out.extend(args);
    out.push(format!("rd.kiwi.install.image={image_url}"));
    out.push("rd.kiwi.install.pass.bootparam".into());
    out.push("BOOTIF=01-${netX/mac:hexhyp}".into());
    out.push(format!("razorurl={POST_INSTALL_URL}"));
    Ok(out.join(" "))
}

/// The post-install URL a booting installer passes on, as template text.
pub const POST_INSTALL_URL: &str =
    "http://@SERVER_IP@:@SERVER_PORT@/post-install?id=@id@&bootid=@bootid@";

/// The URL of a file of image `name`, as template text.
pub fn file_url(name: &str, file: &str) -> String {
    format!("http://@SERVER_IP@:@SERVER_PORT@/images/{name}/{file}")
}

/// The `host.tmpl` that boots `kernel` and `initrd` of image `name` with
/// `args`, explaining any failure on the console before it reboots. With
/// `install_device`, a host whose metadata has `installdevice` also gets
/// `rd.kiwi.oem.installdevice=<it>` (see [`install_device_lines`]).
pub fn boot_script(
    name: &str,
    header: &[String],
    kernel: &str,
    initrd: &str,
    args: &str,
    install_device: bool,
) -> String {
    let k = file_url(name, kernel);
    let mut s = String::from("#!ipxe\n");
    for h in header {
        s.push_str(&format!("# {h}\n"));
    }
    s.push_str(&format!(
        "echo KIWIspray: booting image {name} on host @id@ (@hostname@)\nimgfree\n"
    ));
    if install_device {
        s.push_str(&install_device_lines(&k, args));
    } else {
        s.push_str(&format!("kernel {k} {args} || goto ks-failed\n"));
    }
    s.push_str(&format!(
        "initrd {i} || goto ks-failed\n\
         boot || goto ks-failed\n\
         \n\
         :ks-failed\n\
         echo KIWIspray: cannot boot image {name}: loading its kernel or initrd from\n\
         echo   http://@SERVER_IP@:@SERVER_PORT@/images/{name}/ failed (see the error above).\n\
         echo Rebooting in 60 seconds.\n\
         sleep 60\n\
         reboot\n",
        i = file_url(name, initrd),
    ));
    s
}

/// The `host.grub` beside the `host.tmpl` of [`boot_script`]: the same
/// kernel, initrd and arguments for the GRUB flavour (`args` in the iPXE
/// form that [`kernel_args`] makes). The kernel and initrd come over HTTP
/// where this GRUB has it, else from the device GRUB came from (TFTP under
/// Secure Boot); `initrd=` is left out (GRUB's `initrd` command loads it)
/// and `BOOTIF=` is the MAC that `bootstrap.grub` booted from. Every value
/// stands in GRUB's single quotes, and placeholders go through the `grub`
/// filter.
pub fn grub_boot_script(
    name: &str,
    header: &[String],
    kernel: &str,
    initrd: &str,
    args: &str,
    install_device: bool,
) -> String {
    let words: Vec<String> = args
        .split_whitespace()
        .filter(|w| !w.starts_with("initrd=") && !w.starts_with("BOOTIF="))
        .map(grub_placeholders)
        .collect();
    let q = |s: &str| crate::render::grub_quoted(s).unwrap_or_default();
    let mut s = String::new();
    for h in header {
        s.push_str(&format!("# {h}\n"));
    }
    s.push_str("# GRUB flavour: $ks_dev, $ks_proto and $ks_bootif are set by bootstrap.grub.\n");
    s.push_str(&format!(
        "echo 'KIWIspray: booting image {n} on host @id|grub@ (@hostname|grub@)'\n\
         set ks_image='{n}'\n\
         set ks_http='(http,@SERVER_IP|grub@:@SERVER_PORT|grub@)/images/{n}'\n\
         set ks_args='{a}'\n",
        n = q(name),
        a = words.join(" ").replace('\'', "'\\''"),
    ));
    if install_device {
        let key = format!("metadata.{INSTALL_DEVICE_KEY}");
        s.push_str(&format!(
            "# The install disk: rd.kiwi.oem.installdevice= from the host's metadata\n\
             # {INSTALL_DEVICE_KEY}, if it has one (a missing value stays a placeholder,\n\
             # which is no /dev/ path); else the installer picks the disk.\n\
             set ks_device='@{key}|grub@'\n\
             if regexp '^/dev/[A-Za-z0-9/._:+,@=-]+$' \"$ks_device\"; then\n\
             \x20 set ks_args=\"$ks_args rd.kiwi.oem.installdevice=$ks_device\"\n\
             fi\n"
        ));
    }
    s.push_str(&format!(
        "function ks_boot {{\n\
         \x20 if linux \"$1/{k}\" $ks_args \"BOOTIF=01-$ks_bootif\"; then\n\
         \x20   if initrd \"$1/{i}\"; then boot; fi\n\
         \x20 fi\n\
         }}\n\
         if [ \"$ks_proto\" != http ]; then\n\
         \x20 if insmod http; then ks_boot \"$ks_http\"; fi\n\
         fi\n\
         set ks_from=\"($ks_dev)/images/$ks_image\"\n\
         ks_boot \"$ks_from\"\n\
         echo 'KIWIspray: cannot boot image {n}: loading its kernel or initrd from' \"$ks_from\" 'failed (see the error above).'\n\
         echo 'Rebooting in 60 seconds.'\n\
         sleep 60\n\
         reboot\n",
        k = q(kernel).replace('"', ""),
        i = q(initrd).replace('"', ""),
        n = q(name),
    ));
    s
}

/// The generated `host.grub` must parse as a template.
fn check_generated_grub(script: &str) -> Result<(), ImportError> {
    crate::render::Template::parse(Path::new("host.grub"), script)
        .map(|_| ())
        .map_err(|e| ImportError::Invalid(format!("the generated host.grub does not parse: {e}")))
}

/// `@name@` placeholders in generated GRUB text become `@name|grub@`, so
/// their values cannot end the single quotes they stand in.
fn grub_placeholders(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 8);
    let mut rest = word;
    while let Some(start) = rest.find('@') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('@') {
            Some(end)
                if end > 0
                    && after[..end]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) =>
            {
                out.push_str(&format!("@{}|grub@", &after[..end]));
                rest = &after[end + 1..];
            }
            _ => {
                out.push('@');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The file in an image directory where `import-image` records what it
/// found out about the build, for `check`.
pub const IMAGE_INFO: &str = "image.json";

/// What `import-image` found out about a KIWI build (`images/<NAME>/image.json`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    /// The installer initrd that was read.
    #[serde(default)]
    pub installer_initrd: String,
    /// `true`: the installer's `/.profile` has `kiwi_oemunattended='true'`;
    /// `false`: it lacks it, so the installer asks "Destroying ALL data on
    /// <disk>, continue ?" unless the kernel line names the disk
    /// (`rd.kiwi.oem.installdevice=`); `null`: unknown.
    #[serde(default)]
    pub unattended: Option<bool>,
    /// Why `unattended` is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_because: Option<String>,
    /// The operator's install deadline for this image, in minutes, over
    /// the deployment's `install_deadline_minutes`; kept across re-imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_deadline_minutes: Option<u64>,
}

impl ImageInfo {
    /// The record of the image in `dir`, if it has a readable one.
    pub fn read(dir: &Path) -> Option<ImageInfo> {
        serde_json::from_slice(&fs::read(dir.join(IMAGE_INFO)).ok()?).ok()
    }
}

/// The host metadata key that names a host's install disk.
pub const INSTALL_DEVICE_KEY: &str = "installdevice";

/// The `kernel` lines of a `host.tmpl` that add
/// `rd.kiwi.oem.installdevice=<metadata.installdevice>` when the host has
/// that metadata. A missing placeholder stays literally in place, and
/// `@x|ipxe@` and `@x@` are equal only when the value exists; the `ipxe`
/// filter refuses a value that is not one safe word, so an unsafe value
/// fails the render instead of reaching the kernel line.
fn install_device_lines(kernel_url: &str, args: &str) -> String {
    let key = format!("metadata.{INSTALL_DEVICE_KEY}");
    format!(
        "# The install disk: rd.kiwi.oem.installdevice= from the host's metadata\n\
         # {INSTALL_DEVICE_KEY}, if it has one; else the installer picks the disk.\n\
         iseq @{key}|ipxe@ @{key}@ || goto ks-no-installdevice\n\
         kernel {kernel_url} {args} rd.kiwi.oem.installdevice=@{key}|ipxe@ || goto ks-failed\n\
         goto ks-initrd\n\
         :ks-no-installdevice\n\
         kernel {kernel_url} {args} || goto ks-failed\n\
         :ks-initrd\n"
    )
}

/// Checks the shape of an install disk: an absolute path under `/dev/`
/// (`/dev/sda`, `/dev/disk/by-id/...`), one word that iPXE and the kernel
/// command line take literally, without `.` or `..` components.
pub fn check_install_device(dev: &str) -> Result<(), String> {
    let shape = dev.strip_prefix("/dev/").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
    });
    if !shape {
        return Err(format!(
            "{INSTALL_DEVICE_KEY} {:?} is not a device path such as /dev/sda or /dev/disk/by-id/...",
            dev.chars().take(80).collect::<String>()
        ));
    }
    if !dev
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-:+,@=".contains(&b))
    {
        return Err(format!(
            "{INSTALL_DEVICE_KEY} {:?} has characters that cannot go on the kernel command line \
             (allowed: letters, digits and / . _ - : + , @ =)",
            dev.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

/// Reads the installer initrd of a build and says whether it installs
/// unattended, with the warnings for the operator.
fn installer_info(name: &str, initrd: &Path, shown: &str, args: &str) -> (ImageInfo, Vec<String>) {
    let mut info = ImageInfo {
        installer_initrd: shown.to_string(),
        ..ImageInfo::default()
    };
    let mut warnings = Vec::new();
    match installer_profile(initrd) {
        Ok(Some(profile)) => info.unattended = Some(profile_unattended(&profile)),
        Ok(None) => {
            info.unknown_because = Some(format!("{shown} has no /.profile (not a KIWI installer?)"))
        }
        Err(e) => {
            if e.contains("not installed") {
                warnings.push(format!(
                    "cannot tell whether image {name} installs unattended: {e}"
                ));
            }
            info.unknown_because = Some(e);
        }
    }
    let everywhere = args
        .split_whitespace()
        .any(|w| w.starts_with("rd.kiwi.oem.installdevice="));
    if info.unattended == Some(false) && !everywhere {
        warnings.push(format!(
            "image {name} is attended: its installer ({shown}) lacks kiwi_oemunattended='true' \
             and stops at \"Destroying ALL data on <disk>, continue ?\"; rebuild it with \
             <oem-unattended>true</oem-unattended> or give each host an install disk \
             (kiwispray-hosts set HOST --meta-set {INSTALL_DEVICE_KEY}=/dev/disk/by-id/...)"
        ));
    }
    (info, warnings)
}

/// Whether a KIWI `/.profile` turns the installer's question off.
pub fn profile_unattended(profile: &str) -> bool {
    profile.lines().any(|l| {
        l.trim()
            .strip_prefix("kiwi_oemunattended=")
            .is_some_and(|v| {
                v.trim()
                    .trim_matches(['\'', '"'])
                    .eq_ignore_ascii_case("true")
            })
    })
}

/// A reader that counts what was consumed.
struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: BufRead> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counted<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.pos += n as u64;
        self.inner.consume(n);
    }
}

/// Reads up to `buf.len()` bytes; fewer only at the end of the input.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Where a scan of cpio archives stopped.
enum CpioScan {
    /// The content of `/.profile`.
    Profile(Vec<u8>),
    /// The input ended after complete archives.
    End,
    /// Something else starts at this position; its first bytes.
    Other(u64, Vec<u8>),
}

/// The largest `/.profile` that is read.
const PROFILE_LIMIT: u64 = 1 << 20;

/// Reads consecutive cpio archives ("newc", as the kernel and dracut use
/// them), with the zero padding between them, until `/.profile` is found.
fn scan_cpio<R: BufRead>(r: &mut Counted<R>) -> io::Result<CpioScan> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    loop {
        loop {
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return Ok(CpioScan::End);
            }
            let zeros = buf.iter().take_while(|b| **b == 0).count();
            let all = zeros == buf.len();
            r.consume(zeros);
            if !all {
                break;
            }
        }
        let start = r.pos;
        let mut magic = [0u8; 6];
        let n = read_up_to(r, &mut magic)?;
        if n < 6 || !(magic == *b"070701" || magic == *b"070702") {
            return Ok(CpioScan::Other(start, magic[..n].to_vec()));
        }
        // One archive: entries until TRAILER!!!.
        loop {
            let mut head = [0u8; 104];
            if read_up_to(r, &mut head)? < head.len() {
                return Err(bad("a cpio header is cut short"));
            }
            let field = |i: usize| -> io::Result<u64> {
                let t = std::str::from_utf8(&head[i * 8..i * 8 + 8])
                    .map_err(|_| bad("a cpio header is not hex"))?;
                u64::from_str_radix(t, 16).map_err(|_| bad("a cpio header is not hex"))
            };
            let (mode, size, namesize) = (field(1)?, field(6)?, field(11)?);
            if namesize == 0 || namesize > 4096 {
                return Err(bad("a cpio entry has an impossible name length"));
            }
            let mut name = vec![0u8; namesize as usize];
            if read_up_to(r, &mut name)? < name.len() {
                return Err(bad("a cpio entry name is cut short"));
            }
            let name_pad = (4 - (110 + namesize) % 4) % 4;
            io::copy(&mut r.by_ref().take(name_pad), &mut io::sink())?;
            let name = String::from_utf8_lossy(&name);
            let name = name.trim_end_matches('\0');
            let data_pad = (4 - size % 4) % 4;
            if name == "TRAILER!!!" {
                io::copy(&mut r.by_ref().take(size + data_pad), &mut io::sink())?;
                break;
            }
            let path = name.trim_start_matches("./").trim_start_matches('/');
            if path == ".profile" && mode & 0o170000 == 0o100000 && size <= PROFILE_LIMIT {
                let mut data = vec![0u8; size as usize];
                if read_up_to(r, &mut data)? < data.len() {
                    return Err(bad("/.profile is cut short"));
                }
                return Ok(CpioScan::Profile(data));
            }
            let skipped = io::copy(&mut r.by_ref().take(size + data_pad), &mut io::sink())?;
            if skipped < size {
                return Err(bad("a cpio entry is cut short"));
            }
            let mut next = [0u8; 6];
            if read_up_to(r, &mut next)? < 6 || !(next == *b"070701" || next == *b"070702") {
                return Err(bad("a cpio entry is not followed by another"));
            }
        }
    }
}

/// The decompressor for data that starts with `magic`.
fn decompressor(magic: &[u8]) -> Option<&'static str> {
    if magic.starts_with(b"\xfd7zXZ\0") {
        Some("xz")
    } else if magic.starts_with(b"\x1f\x8b") {
        Some("gzip")
    } else if magic.starts_with(b"\x28\xb5\x2f\xfd") {
        Some("zstd")
    } else if magic.starts_with(b"BZh") {
        Some("bzip2")
    } else if magic.starts_with(b"\x02\x21\x4c\x18") {
        Some("lz4")
    } else {
        None
    }
}

/// The `/.profile` of an installer initrd, read without root and without
/// unpacking: an initrd is cpio archives, the first ones often uncompressed
/// (early microcode), then one compressed with xz, gzip, zstd, bzip2 or lz4,
/// which the system's tool decompresses through a pipe. `Ok(None)` when
/// the archives have no `/.profile`.
pub fn installer_profile(initrd: &Path) -> Result<Option<String>, String> {
    let shown = initrd
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let open = || fs::File::open(initrd).map_err(|e| format!("cannot read {shown}: {e}"));
    let mut r = Counted {
        inner: io::BufReader::new(open()?),
        pos: 0,
    };
    let (at, magic) = match scan_cpio(&mut r) {
        Ok(CpioScan::Profile(p)) => return Ok(Some(String::from_utf8_lossy(&p).into_owned())),
        Ok(CpioScan::End) => return Ok(None),
        Ok(CpioScan::Other(at, magic)) => (at, magic),
        Err(e) => return Err(format!("{shown} is not a readable initrd: {e}")),
    };
    let Some(tool) = decompressor(&magic) else {
        return Err(format!(
            "{shown} is neither a cpio archive nor compressed with xz, gzip, zstd, bzip2 or lz4"
        ));
    };
    let mut file = open()?;
    io::Seek::seek(&mut file, io::SeekFrom::Start(at))
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut child = Command::new(tool)
        .args(["-d", "-c"])
        .stdin(Stdio::from(file))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                format!("{shown} is {tool}-compressed and {tool} is not installed")
            } else {
                format!("cannot run {tool}: {e}")
            }
        })?;
    let out = child.stdout.take().expect("piped");
    let scanned = scan_cpio(&mut Counted {
        inner: io::BufReader::new(out),
        pos: 0,
    });
    // The rest of the archive is not needed.
    let _ = child.kill();
    let status = child.wait();
    match scanned {
        Ok(CpioScan::Profile(p)) => Ok(Some(String::from_utf8_lossy(&p).into_owned())),
        // Something after the archives that is not one: nothing more to read.
        Ok(CpioScan::Other(..)) => Ok(None),
        Ok(CpioScan::End) if status.as_ref().is_ok_and(|s| s.success()) => Ok(None),
        Ok(CpioScan::End) => Err(format!("{shown} does not decompress with {tool}")),
        Err(e) => Err(format!(
            "{shown}: the {tool}-compressed part is not a readable cpio archive: {e}"
        )),
    }
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct Imported {
    pub name: String,
    pub dir: PathBuf,
    /// What was recognised, for the operator.
    pub kind: String,
    pub files: Vec<String>,
    pub replaced: bool,
    /// What the installer does before it writes the disk (KIWI builds).
    pub unattended: Option<bool>,
    /// What the operator should know (one line each).
    pub warnings: Vec<String>,
}

/// A directory under construction; removed unless committed.
struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn staging(images: &Path, name: &str) -> Result<Staging, ImportError> {
    fs::create_dir_all(images)
        .map_err(|e| io_err(format!("cannot create {}", images.display()), e))?;
    let path = images.join(format!(".import-{name}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&path);
    fs::create_dir(&path).map_err(|e| io_err(format!("cannot create {}", path.display()), e))?;
    Ok(Staging { path, keep: false })
}

/// Refuses early when the image exists and `force` is off.
fn check_target(images: &Path, name: &str, force: bool) -> Result<PathBuf, ImportError> {
    let target = images.join(name);
    if fs::symlink_metadata(&target).is_ok() && !force {
        return Err(ImportError::Exists(format!(
            "image {name} already exists ({}); use --force to replace it",
            target.display()
        )));
    }
    Ok(target)
}

/// Moves the finished staging directory into place, replacing an existing
/// image only with `force`.
fn commit(mut stage: Staging, target: &Path, force: bool) -> Result<bool, ImportError> {
    let exists = fs::symlink_metadata(target).is_ok();
    if exists && !force {
        return Err(ImportError::Exists(format!(
            "{} appeared during the import; use --force to replace it",
            target.display()
        )));
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = target.with_file_name(format!(".old-{name}.{}", std::process::id()));
    if exists {
        fs::rename(target, &old)
            .map_err(|e| io_err(format!("cannot move the old {} aside", target.display()), e))?;
    }
    if let Err(e) = fs::rename(&stage.path, target) {
        if exists {
            let _ = fs::rename(&old, target);
        }
        return Err(io_err(
            format!("cannot move the import into {}", target.display()),
            e,
        ));
    }
    stage.keep = true;
    if exists {
        let removed = if fs::symlink_metadata(&old).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&old)
        } else {
            fs::remove_file(&old)
        };
        if let Err(e) = removed {
            eprintln!(
                "kiwispray-hosts: warning: cannot remove the old image {}: {e}",
                old.display()
            );
        }
    }
    if let Some(dir) = target.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(exists)
}

/// Regular files directly in `dir` (symlinks are ignored: the build's
/// `<P>.kernel` symlink is recreated, and nothing in an archive is followed).
fn regular_files(dir: &Path) -> Result<Vec<String>, ImportError> {
    let mut names = Vec::new();
    let rd = fs::read_dir(dir).map_err(|e| io_err(format!("cannot read {}", dir.display()), e))?;
    for entry in rd {
        let entry = entry.map_err(|e| io_err(format!("cannot read {}", dir.display()), e))?;
        let meta = fs::symlink_metadata(entry.path())
            .map_err(|e| io_err(format!("cannot read {}", entry.path().display()), e))?;
        if meta.is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The directory of a build: `dir` itself, or its only subdirectory.
fn build_dir(dir: &Path) -> Result<PathBuf, ImportError> {
    let names = regular_files(dir)?;
    if names.iter().any(|n| n.ends_with(".append")) {
        return Ok(dir.to_path_buf());
    }
    let subdirs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| io_err(format!("cannot read {}", dir.display()), e))?
        .filter_map(Result::ok)
        .filter(|e| fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir()))
        .map(|e| e.path())
        .collect();
    match subdirs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Ok(dir.to_path_buf()),
    }
}

/// Unpacks a tar (optionally xz-compressed) into `dest` with the system's
/// `tar`, feeding it through a pipe so that progress can be shown.
fn untar(source: &Path, dest: &Path, progress: bool) -> Result<(), ImportError> {
    let mut file = fs::File::open(source)
        .map_err(|e| io_err(format!("cannot open {}", source.display()), e))?;
    let len = file.metadata().map(|m| m.len()).ok();
    let mut magic = [0u8; 6];
    let n = file
        .read(&mut magic)
        .map_err(|e| io_err(format!("cannot read {}", source.display()), e))?;
    let xz = n == 6 && magic == *b"\xfd7zXZ\0";
    drop(file);
    let mut file = fs::File::open(source)
        .map_err(|e| io_err(format!("cannot open {}", source.display()), e))?;
    let mut cmd = Command::new("tar");
    cmd.arg("-x");
    if xz {
        cmd.arg("-J");
    }
    cmd.args([
        "-f",
        "-",
        "--no-same-owner",
        "--delay-directory-restore",
        "-C",
    ])
    .arg(dest)
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut tar = spawn(&mut cmd, "tar")?;
    let shown = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut p = Progress::new(format!("unpacking {shown}"), len, progress);
    let copied = {
        let mut input = tar.stdin.take().expect("piped");
        pump(&mut file, &mut input, &mut p)
    };
    let err = read_stderr(&mut tar);
    let status = tar.wait().map_err(|e| io_err("waiting for tar", e))?;
    if !status.success() {
        return Err(ImportError::Invalid(format!(
            "{} is not a readable tar archive: {}",
            source.display(),
            if err.is_empty() {
                "tar failed".to_string()
            } else {
                err
            }
        )));
    }
    if let Err(e) = copied {
        // tar exited successfully without reading everything: fine for
        // trailing padding; anything else shows as a missing file later.
        if e.kind() != io::ErrorKind::BrokenPipe {
            return Err(io_err(format!("reading {}", source.display()), e));
        }
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path, progress: bool) -> Result<(), ImportError> {
    let mut r =
        fs::File::open(from).map_err(|e| io_err(format!("cannot open {}", from.display()), e))?;
    let len = r.metadata().map(|m| m.len()).ok();
    let mut w =
        fs::File::create(to).map_err(|e| io_err(format!("cannot create {}", to.display()), e))?;
    let shown = from
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut p = Progress::new(format!("copying {shown}"), len, progress);
    pump(&mut r, &mut w, &mut p)
        .map_err(|e| io_err(format!("cannot copy {}", from.display()), e))?;
    w.sync_all()
        .map_err(|e| io_err(format!("cannot write {}", to.display()), e))?;
    Ok(())
}

fn sync_file(path: &Path) -> Result<(), ImportError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(format!("cannot sync {}", path.display()), e))
}

fn write_file(path: &Path, text: &str) -> Result<(), ImportError> {
    let mut f = fs::File::create(path)
        .map_err(|e| io_err(format!("cannot create {}", path.display()), e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(format!("cannot write {}", path.display()), e))
}

/// Imports a KIWI oem PXE build (`*.install.tar`, `*.install.tar.xz` or a
/// directory of its files) as image `name` under `images`.
pub fn import_image(
    images: &Path,
    name: &str,
    source: &Path,
    extra_args: &str,
    force: bool,
    progress: bool,
) -> Result<Imported, ImportError> {
    check_image_name(name).map_err(ImportError::Invalid)?;
    let meta = fs::metadata(source).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ImportError::NotFound(format!("{} does not exist", source.display()))
        } else {
            io_err(format!("cannot read {}", source.display()), e)
        }
    })?;
    let target = check_target(images, name, force)?;
    let stage = staging(images, name)?;
    // A tar is unpacked inside the staging directory, so its files can be
    // renamed into place instead of copied.
    let (dir, unpacked) = if meta.is_dir() {
        (build_dir(source)?, false)
    } else {
        let unpack = stage.path.join(".unpack");
        fs::create_dir(&unpack)
            .map_err(|e| io_err(format!("cannot create {}", unpack.display()), e))?;
        untar(source, &unpack, progress)?;
        (build_dir(&unpack)?, true)
    };
    let names = regular_files(&dir)?;
    let build = Build::detect(&names)
        .map_err(|e| ImportError::Invalid(format!("{}: {e}", source.display())))?;
    let sum_text = fs::read_to_string(dir.join(&build.checksum))
        .map_err(|e| io_err(format!("cannot read {}", build.checksum), e))?;
    let sum = Checksum::parse(&build.checksum, &sum_text).map_err(ImportError::Invalid)?;
    let append = fs::read_to_string(dir.join(&build.append))
        .map_err(|e| io_err(format!("cannot read {}", build.append), e))?;
    let size = verify_image(&dir.join(&build.image), &sum, progress)?;
    for f in build.files() {
        let (from, to) = (dir.join(f), stage.path.join(f));
        if unpacked {
            fs::rename(&from, &to).map_err(|e| io_err(format!("cannot move {f}"), e))?;
            sync_file(&to)?;
        } else {
            copy_file(&from, &to, progress)?;
        }
    }
    if unpacked {
        fs::remove_dir_all(stage.path.join(".unpack"))
            .map_err(|e| io_err("cannot remove the unpacked archive", e))?;
    }
    let link = format!("{}.kernel", build.prefix);
    if link != build.installer_kernel {
        std::os::unix::fs::symlink(&build.installer_kernel, stage.path.join(&link))
            .map_err(|e| io_err(format!("cannot create the symlink {link}"), e))?;
    }
    let image_url = file_url(name, &build.image);
    let mut args = kernel_args(&append, &image_url, &build.installer_initrd)
        .map_err(|e| ImportError::Invalid(format!("{}: {e}", build.append)))?;
    if !extra_args.trim().is_empty() {
        let extra = extra_args.split_whitespace().collect::<Vec<_>>().join(" ");
        if extra.contains("${") {
            return Err(ImportError::Invalid(
                "--append must not contain \"${\"".into(),
            ));
        }
        args = format!("{args} {extra}");
    }
    let header = vec![
        format!(
            "Written by kiwispray-hosts import-image from {}.",
            build.append
        ),
        format!("KIWI build {}; {}.", build.prefix, build.generation),
        format!(
            "Boots the KIWI installer, which writes {} ({size} bytes uncompressed) to the disk,",
            build.image
        ),
        "then passes razorurl= (the post-install URL) on to the installed system.".into(),
    ];
    let script = boot_script(
        name,
        &header,
        &build.installer_kernel,
        &build.installer_initrd,
        &args,
        true,
    );
    crate::render::Template::parse(Path::new("host.tmpl"), &script).map_err(|e| {
        ImportError::Invalid(format!("the generated host.tmpl does not parse: {e}"))
    })?;
    write_file(&stage.path.join("host.tmpl"), &script)?;
    let grub = grub_boot_script(
        name,
        &header,
        &build.installer_kernel,
        &build.installer_initrd,
        &args,
        true,
    );
    check_generated_grub(&grub)?;
    write_file(&stage.path.join("host.grub"), &grub)?;
    let mut files: Vec<String> = build.files().iter().map(|s| s.to_string()).collect();
    if link != build.installer_kernel {
        files.push(link);
    }
    files.push("host.grub".into());
    files.push("host.tmpl".into());
    let (mut info, warnings) = installer_info(
        name,
        &stage.path.join(&build.installer_initrd),
        &build.installer_initrd,
        &args,
    );
    // What the operator set for the image before stays.
    info.install_deadline_minutes =
        ImageInfo::read(&target).and_then(|old| old.install_deadline_minutes);
    write_file(
        &stage.path.join(IMAGE_INFO),
        &format!(
            "{}\n",
            serde_json::to_string_pretty(&info)
                .map_err(|e| io_err("cannot write image.json", e))?
        ),
    )?;
    files.push(IMAGE_INFO.into());
    files.sort();
    let replaced = commit(stage, &target, force)?;
    Ok(Imported {
        name: name.to_string(),
        dir: target,
        kind: format!("KIWI build {}, {}", build.prefix, build.generation),
        files,
        replaced,
        unattended: info.unattended,
        warnings,
    })
}

/// Lists a directory inside an ISO with `xorriso`.
fn iso_ls(iso: &Path, dir: &str) -> Result<Vec<String>, ImportError> {
    let out = spawn(
        Command::new("xorriso")
            .args(["-abort_on", "FAILURE", "-indev"])
            .arg(iso)
            .args(["-lsd", &format!("{dir}/*")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "xorriso",
    )?
    .wait_with_output()
    .map_err(|e| io_err("running xorriso", e))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No ISO 9660 image") || stderr.contains("Media status : is blank") {
        return Err(ImportError::Invalid(format!(
            "{} is not an ISO 9660 image",
            iso.display()
        )));
    }
    if !out.status.success() {
        if stderr.contains("not found")
            || stderr.contains("Not found")
            || stderr.contains("No such")
        {
            return Ok(Vec::new());
        }
        let why = stderr
            .lines()
            .find(|l| l.contains("FAILURE") || l.contains("SORRY"))
            .unwrap_or("xorriso failed")
            .trim()
            .to_string();
        return Err(ImportError::Invalid(format!(
            "{}: cannot read as an ISO: {why}",
            iso.display()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix('\''))
        .filter_map(|l| l.strip_suffix('\''))
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
        .collect())
}

/// Imports a live ISO as image `name`: its `/boot/<arch>/loader/linux` and
/// `initrd` are extracted, the ISO is copied beside them and `host.tmpl`
/// boots it with `root=live:<URL of the ISO>`.
pub fn import_live_iso(
    images: &Path,
    name: &str,
    iso: &Path,
    arch: Option<&str>,
    extra_args: &str,
    force: bool,
    progress: bool,
) -> Result<Imported, ImportError> {
    check_image_name(name).map_err(ImportError::Invalid)?;
    let meta = fs::metadata(iso).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ImportError::NotFound(format!("{} does not exist", iso.display()))
        } else {
            io_err(format!("cannot read {}", iso.display()), e)
        }
    })?;
    if !meta.is_file() {
        return Err(ImportError::Invalid(format!(
            "{} is not a file",
            iso.display()
        )));
    }
    if extra_args.contains("${") {
        return Err(ImportError::Invalid(
            "--append must not contain \"${\"".into(),
        ));
    }
    let target = check_target(images, name, force)?;
    let arches = iso_ls(iso, "/boot")?;
    let mut with_loader = Vec::new();
    for a in &arches {
        let files = iso_ls(iso, &format!("/boot/{a}/loader"))?;
        if files.iter().any(|f| f == "linux") && files.iter().any(|f| f == "initrd") {
            with_loader.push(a.clone());
        }
    }
    let arch = match (arch, with_loader.as_slice()) {
        (Some(a), found) if found.iter().any(|f| f == a) => a.to_string(),
        (Some(a), found) => {
            return Err(ImportError::Invalid(format!(
                "{} has no /boot/{a}/loader/linux and initrd (found: {})",
                iso.display(),
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(", ")
                }
            )))
        }
        (None, []) => {
            return Err(ImportError::Invalid(format!(
                "{} has no /boot/<arch>/loader/linux and initrd: not a KIWI live ISO",
                iso.display()
            )))
        }
        (None, [one]) => one.clone(),
        (None, many) => {
            return Err(ImportError::Invalid(format!(
                "{} boots several architectures ({}); choose one with --arch",
                iso.display(),
                many.join(", ")
            )))
        }
    };
    if !arch
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ImportError::Invalid(format!(
            "unexpected architecture name {arch:?}"
        )));
    }
    let stage = staging(images, name)?;
    let out = spawn(
        Command::new("xorriso")
            .args(["-abort_on", "FAILURE", "-osirrox", "on", "-indev"])
            .arg(iso)
            .arg("-extract")
            .arg(format!("/boot/{arch}/loader/linux"))
            .arg(stage.path.join("linux"))
            .arg("-extract")
            .arg(format!("/boot/{arch}/loader/initrd"))
            .arg(stage.path.join("initrd"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        "xorriso",
    )?
    .wait_with_output()
    .map_err(|e| io_err("running xorriso", e))?;
    if !out.status.success()
        || !stage.path.join("linux").is_file()
        || !stage.path.join("initrd").is_file()
    {
        return Err(ImportError::Io(format!(
            "cannot extract linux and initrd from {}: {}",
            iso.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("xorriso failed")
        )));
    }
    for f in ["linux", "initrd"] {
        // Extracted files keep the ISO's read-only modes; the web server
        // only needs to read them, but a later --force must remove them.
        let p = stage.path.join(f);
        let _ = fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644));
        sync_file(&p)?;
    }
    let iso_name = format!("{name}.iso");
    copy_file(iso, &stage.path.join(&iso_name), progress)?;
    let mut args = format!(
        "initrd=initrd root=live:{} ip=dhcp rd.neednet=1 BOOTIF=01-${{netX/mac:hexhyp}} razorurl={POST_INSTALL_URL}",
        file_url(name, &iso_name)
    );
    let extra = extra_args.split_whitespace().collect::<Vec<_>>().join(" ");
    if !extra.is_empty() {
        args = format!("{args} {extra}");
    }
    let header = vec![
        format!(
            "Written by kiwispray-hosts import-live-iso from {}.",
            iso.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        format!("Boots the live system's /boot/{arch}/loader/linux and initrd; the system"),
        format!("fetches {iso_name} over HTTP (root=live:) and runs from memory."),
    ];
    let script = boot_script(name, &header, "linux", "initrd", &args, false);
    write_file(&stage.path.join("host.tmpl"), &script)?;
    let grub = grub_boot_script(name, &header, "linux", "initrd", &args, false);
    check_generated_grub(&grub)?;
    write_file(&stage.path.join("host.grub"), &grub)?;
    let replaced = commit(stage, &target, force)?;
    Ok(Imported {
        name: name.to_string(),
        dir: target,
        kind: format!("live ISO, {arch}"),
        files: vec![
            "host.grub".into(),
            "host.tmpl".into(),
            "initrd".into(),
            iso_name,
            "linux".into(),
        ],
        replaced,
        unattended: None,
        warnings: Vec::new(),
    })
}

/// The digest of the image in an imported image directory, as
/// `<algorithm>:<hex>` from its checksum file (`None` if the directory holds
/// no recognisable build or checksum). Read at each install boot, so that
/// every attempt records what it installed.
pub fn image_digest(dir: &Path) -> Option<String> {
    let names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let build = Build::detect(&names).ok()?;
    let text = fs::read_to_string(dir.join(&build.checksum)).ok()?;
    let sum = Checksum::parse(&build.checksum, &text).ok()?;
    let algorithm = build.checksum.rsplit('.').next().unwrap_or("");
    Some(format!("{algorithm}:{}", sum.digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn detects_all_three_generations() {
        let p = "web.x86_64-1.2.3";
        let current = Build::detect(&names(&[
            "web.x86_64-1.2.3.xz",
            "web.x86_64-1.2.3.sha256",
            "web.x86_64-1.2.3.append",
            "web.x86_64-1.2.3.initrd",
            "web.x86_64-1.2.3.config.bootoptions",
            "pxeboot.web.x86_64-1.2.3.kernel",
            "pxeboot.web.x86_64-1.2.3.initrd",
            "web.x86_64-1.2.3.packages",
        ]))
        .unwrap();
        assert_eq!(current.generation, Generation::Current);
        assert_eq!(current.prefix, p);
        assert_eq!(current.installer_initrd, format!("pxeboot.{p}.initrd"));
        assert_eq!(current.installer_kernel, format!("pxeboot.{p}.kernel"));
        let middle = Build::detect(&names(&[
            "web.x86_64-1.2.3.xz",
            "web.x86_64-1.2.3.md5",
            "web.x86_64-1.2.3.append",
            "web.x86_64-1.2.3.initrd",
            "pxeboot.web.x86_64-1.2.3.kernel",
            "pxeboot.web.x86_64-1.2.3.initrd.xz",
        ]))
        .unwrap();
        assert_eq!(middle.generation, Generation::XzInitrd);
        assert_eq!(middle.checksum, format!("{p}.md5"));
        assert_eq!(middle.bootoptions, None);
        let bare = Build::detect(&names(&[
            "image1.xz",
            "image1.md5",
            "image1.append",
            "image1.initrd",
            "pxeboot.kernel",
            "pxeboot.initrd.xz",
        ]))
        .unwrap();
        assert_eq!(bare.generation, Generation::Bare);
        assert_eq!(bare.installer_kernel, "pxeboot.kernel");
    }

    #[test]
    fn incomplete_builds_are_explained() {
        let err = Build::detect(&names(&["a.xz", "a.sha256"])).unwrap_err();
        assert!(err.contains(".append"), "{err}");
        let err = Build::detect(&names(&[
            "a.append",
            "a.xz",
            "a.initrd",
            "pxeboot.kernel",
            "pxeboot.initrd.xz",
        ]))
        .unwrap_err();
        assert!(err.contains("checksum"), "{err}");
        let err = Build::detect(&names(&[
            "a.append",
            "a.xz",
            "a.sha256",
            "a.initrd",
            "pxeboot.a.kernel",
            "pxeboot.a.initrd",
        ]))
        .unwrap_err();
        assert!(err.contains("config.bootoptions"), "{err}");
        let err = Build::detect(&names(&["a.xz.b.append", "a.xz.b.xz"])).unwrap_err();
        assert!(err.contains(".xz"), "{err}");
    }

    #[test]
    fn checksum_files_parse() {
        let d = "a".repeat(64);
        let c = Checksum::parse("x.sha256", &format!("{d} 16 4096\n")).unwrap();
        assert_eq!((c.algorithm, c.size), (Algorithm::Sha256, Some(65536)));
        assert!(Checksum::parse("x.sha512", &format!("{d} 1 1")).is_err());
        assert!(Checksum::parse("x.md5", "zz 1 1").is_err());
        assert!(Checksum::parse("x.sha256", &format!("{d} x 1")).is_err());
        assert_eq!(
            Checksum::parse("x.md5", &"B".repeat(32)).unwrap().size,
            None
        );
    }

    #[test]
    fn kernel_args_replace_the_example_url() {
        let args = kernel_args(
            "rd.kiwi.install.pxe rd.kiwi.install.image=http://example.com/image.xz console=ttyS0 rd.kiwi.install.pass.bootparam\n",
            "http://@SERVER_IP@:@SERVER_PORT@/images/web/web.x86_64-1.xz",
            "pxeboot.web.x86_64-1.initrd",
        )
        .unwrap();
        assert_eq!(
            args,
            "initrd=pxeboot.web.x86_64-1.initrd rd.kiwi.install.pxe console=ttyS0 \
             rd.kiwi.install.image=http://@SERVER_IP@:@SERVER_PORT@/images/web/web.x86_64-1.xz \
             rd.kiwi.install.pass.bootparam BOOTIF=01-${netX/mac:hexhyp} \
             razorurl=http://@SERVER_IP@:@SERVER_PORT@/post-install?id=@id@&bootid=@bootid@"
        );
        assert!(kernel_args("x=${evil}", "u", "i").is_err());
        assert!(kernel_args("", "u", "i")
            .unwrap()
            .contains("rd.kiwi.install.pxe"));
    }

    #[test]
    fn install_devices_and_profiles() {
        for good in [
            "/dev/sda",
            "/dev/nvme0n1",
            "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4",
            "/dev/disk/by-path/pci-0000:00:1f.2-ata-1",
        ] {
            assert!(check_install_device(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "sda",
            "/dev/",
            "/dev//sda",
            "/dev/../sda",
            "/dev/./sda",
            "/sys/sda",
            "/dev/sda b",
            "/dev/${x}",
            "/dev/sda||x",
            "/dev/a\\x20b",
            "/dev/sda\n",
        ] {
            assert!(check_install_device(bad).is_err(), "{bad:?}");
        }
        assert!(profile_unattended("a='1'\nkiwi_oemunattended='true'\n"));
        assert!(profile_unattended("kiwi_oemunattended=\"true\""));
        assert!(!profile_unattended("kiwi_oemunattended='false'\n"));
        assert!(!profile_unattended("kiwi_oemunattended_id='true'\n"));
        assert!(!profile_unattended("kiwi_iname='x'\n"));
    }

    #[test]
    fn image_names() {
        assert!(check_image_name("sles15-sp6_web").is_ok());
        for bad in ["new", "finished", "a.xz", "a@b", "../x", ".hidden", ""] {
            assert!(check_image_name(bad).is_err(), "{bad}");
        }
    }
}
