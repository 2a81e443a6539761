//! Boot flavours: the script languages of the boot loaders that fetch
//! `/bootstrap`. iPXE ([`ipxe`]) is the default; GRUB ([`grub`]) is what a
//! machine under Secure Boot runs (Debian's signed shim and GRUB), and what
//! ARM64 machines without iPXE run. A machine names its flavour in each
//! request (`loader=grub`; none means iPXE), so one deployment serves both,
//! and both share one set of rules: identity, life cycle, attempts and
//! bootids are decided before a flavour is asked for a word.
//!
//! A flavour is its templates (`templates/new.<ext>`, `finished.<ext>`,
//! `held.<ext>`, `deferred.<ext>`, `images/<S>/host.<ext>`) and the few
//! scripts the service writes without a template: a refusal that explains
//! itself on the console and reboots, a "come back later", and the body of
//! an error status. A third flavour is one more file here and one more
//! entry in [`FLAVOURS`].

pub mod grub;
pub mod ipxe;

/// What the service needs from a boot loader's script language.
pub trait Flavour: Sync {
    /// The name a machine gives in `loader=`, also shown in events and logs.
    fn name(&self) -> &'static str;
    /// The extension of this flavour's templates (`new.<ext>`, `host.<ext>`).
    fn extension(&self) -> &'static str;
    /// A script that prints `lines` on the console, waits `delay` seconds
    /// and reboots the machine: the answer when it cannot be booted as asked.
    fn refusal(&self, lines: &[String], delay: u32) -> String;
    /// A script that prints `lines`, waits `seconds` and asks the boot
    /// service again.
    fn retry_later(&self, lines: &[String], seconds: u64) -> String;
    /// The body of an error status (4xx, 5xx) with the one-line `reason`:
    /// plain `kiwispray: <reason>` where the loader does not run an error
    /// body (iPXE), harmless script where it does (GRUB).
    fn error_body(&self, reason: &str) -> String;
}

/// Every flavour the service speaks; the first is the default.
pub static FLAVOURS: [&dyn Flavour; 2] = [&ipxe::Ipxe, &grub::Grub];

/// The flavour a request asks for with `loader=` (`None`: the default).
pub fn by_loader(loader: Option<&str>) -> Result<&'static dyn Flavour, String> {
    match loader.map(str::trim) {
        None | Some("") => Ok(FLAVOURS[0]),
        Some(name) => FLAVOURS
            .iter()
            .copied()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown loader {:?} (known: {})",
                    name.chars().take(40).collect::<String>(),
                    names().join(", ")
                )
            }),
    }
}

/// The flavour a raw query string names with `loader=`, if it names a
/// known one: for answering a query that does not parse in the language of
/// the loader that sent it.
pub fn from_raw_query(query: &str) -> Option<&'static dyn Flavour> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("loader="))
        .and_then(|name| by_loader(Some(name)).ok())
}

/// The names of all flavours, default first.
pub fn names() -> Vec<&'static str> {
    FLAVOURS.iter().map(|f| f.name()).collect()
}

/// The flavour whose templates end in `.<ext>`, for `check`.
pub fn by_extension(ext: &str) -> Option<&'static dyn Flavour> {
    FLAVOURS.iter().copied().find(|f| f.extension() == ext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaders_by_name() {
        assert_eq!(by_loader(None).unwrap().name(), "ipxe");
        assert_eq!(by_loader(Some("")).unwrap().name(), "ipxe");
        assert_eq!(by_loader(Some("ipxe")).unwrap().name(), "ipxe");
        assert_eq!(by_loader(Some("grub")).unwrap().name(), "grub");
        let Err(e) = by_loader(Some("uboot")) else {
            panic!("uboot is no loader")
        };
        assert!(
            e.contains("unknown loader \"uboot\"") && e.contains("ipxe, grub"),
            "{e}"
        );
        assert_eq!(by_extension("grub").unwrap().name(), "grub");
        assert_eq!(by_extension("tmpl").unwrap().name(), "ipxe");
        assert!(by_extension("cfg").is_none());
    }
}
