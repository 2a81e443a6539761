//! The GRUB flavour: templates `*.grub` in GRUB script, for machines that
//! boot Debian's signed shim and GRUB (Secure Boot, ARM64) and run
//! `templates/bootstrap.grub` as their `grub.cfg`. GRUB runs whatever a
//! `source` fetched, error bodies included, and a missing file is no error
//! to it, so every answer here is harmless script: text is printed from
//! single quotes ([`crate::render::grub_quoted`], the `grub` filter), and
//! an error body is a comment plus an `echo`. `bootstrap.grub` sets
//! `$prefix` (the device GRUB came from, over TFTP or HTTP); a retry runs
//! it again from there.

use super::Flavour;
use crate::render::grub_quoted;

pub struct Grub;

impl Flavour for Grub {
    fn name(&self) -> &'static str {
        "grub"
    }

    fn extension(&self) -> &'static str {
        "grub"
    }

    fn refusal(&self, lines: &[String], delay: u32) -> String {
        let mut s = header(lines.first().map_or("", String::as_str));
        s.push_str("echo\necho 'KIWIspray cannot boot this machine as asked:'\n");
        for l in lines {
            s.push_str(&format!("echo '  {}'\n", quoted(l)));
        }
        s.push_str(&format!(
            "echo 'Rebooting in {delay} seconds.'\nsleep {delay}\nreboot\n"
        ));
        s
    }

    fn retry_later(&self, lines: &[String], seconds: u64) -> String {
        let mut s = header(lines.first().map_or("", String::as_str));
        for l in lines {
            s.push_str(&format!("echo '{}'\n", quoted(l)));
        }
        s.push_str(&format!(
            "sleep {seconds}\nconfigfile \"$prefix/grub.cfg\"\nreboot\n"
        ));
        s
    }

    fn error_body(&self, reason: &str) -> String {
        format!("{}echo 'kiwispray: {}'\n", header(reason), quoted(reason))
    }
}

/// The first line of every GRUB answer that is not a template's: a comment
/// with the reason, which the TFTP front end sends as its error message.
fn header(reason: &str) -> String {
    format!("# kiwispray: {}\n", one_line(reason))
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Text for GRUB's single quotes; control characters become spaces.
fn quoted(s: &str) -> String {
    grub_quoted(&one_line(s)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `grub-script-check` (grub-common) on `script`, if it is there.
    fn grub_syntax_ok(script: &str) -> Option<bool> {
        use std::io::Write;
        let mut child = std::process::Command::new("grub-script-check")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(script.as_bytes()).ok()?;
        Some(child.wait().ok()?.success())
    }

    #[test]
    fn answers_keep_hostile_text_inside_quotes() {
        let nasty = "it's ${evil}; reboot # \n$(x) `y` & | < >";
        for s in [
            Grub.refusal(&[nasty.into(), "second".into()], 300),
            Grub.retry_later(&[nasty.into()], 60),
            Grub.error_body(nasty),
        ] {
            assert!(
                s.starts_with("# kiwispray: it's ${evil}; reboot #  $(x)"),
                "{s}"
            );
            // one comment line, then only echo/sleep/reboot/configfile lines
            for line in s.lines().skip(1) {
                let cmd = line.split(' ').next().unwrap();
                assert!(
                    ["echo", "sleep", "reboot", "configfile"].contains(&cmd),
                    "{line:?} in {s}"
                );
            }
            assert!(
                s.contains("it'\\''s ${evil}; reboot #  $(x) `y` & | < >'\n"),
                "{s}"
            );
            if let Some(ok) = grub_syntax_ok(&s) {
                assert!(ok, "grub-script-check refused:\n{s}");
            }
        }
    }
}
