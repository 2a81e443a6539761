//! A man page in roff, generated from a clap [`Command`]: name, synopsis,
//! description, global options, one subsection per subcommand with its
//! arguments, and the long after-help text (exit status, environment).
//! `kiwispray-hosts --generate-man` prints it; `make man` writes
//! `man/kiwispray-hosts.1`, and a test fails when the committed page
//! differs from what the CLI definition generates. Any binary with a clap
//! definition can use [`render`] for its own page.

use clap::{Arg, ArgAction, Command};

/// Escapes text for roff: backslashes, leading dots and quotes, and dashes
/// that must stay ASCII hyphen-minus.
pub fn escape(text: &str) -> String {
    let mut out = String::new();
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let l = line.replace('\\', "\\e").replace('-', "\\-");
        if l.starts_with('.') || l.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&l);
    }
    out
}

fn styled(s: Option<&clap::builder::StyledStr>) -> String {
    s.map(|s| s.to_string()).unwrap_or_default()
}

/// The text of paragraphs: blank lines separate `.PP` paragraphs; lines
/// starting with spaces are kept as they are (`.nf`).
fn paragraphs(out: &mut String, text: &str) {
    for para in text.trim().split("\n\n") {
        let verbatim = para.lines().skip(1).any(|l| l.starts_with(' '));
        out.push_str(".PP\n");
        if verbatim {
            out.push_str(".nf\n");
            out.push_str(&escape(para));
            out.push_str("\n.fi\n");
        } else {
            out.push_str(&escape(
                &para.split_whitespace().collect::<Vec<_>>().join(" "),
            ));
            out.push('\n');
        }
    }
}

fn value_names(a: &Arg) -> String {
    match a.get_value_names() {
        Some(v) if !v.is_empty() => v
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        _ => a.get_id().as_str().to_uppercase(),
    }
}

fn takes_value(a: &Arg) -> bool {
    matches!(a.get_action(), ArgAction::Set | ArgAction::Append)
}

/// The option as it is written: `\fB\-\-root\fR \fIDIR\fR`.
fn option_label(a: &Arg) -> String {
    let mut names = Vec::new();
    if let Some(s) = a.get_short() {
        names.push(format!("\\fB\\-{}\\fR", escape(&s.to_string())));
    }
    if let Some(l) = a.get_long() {
        names.push(format!("\\fB\\-\\-{}\\fR", escape(l)));
    }
    let mut label = names.join(", ");
    if takes_value(a) {
        label.push_str(&format!(" \\fI{}\\fR", escape(&value_names(a))));
    }
    label
}

fn arg_help(a: &Arg) -> String {
    let mut help = styled(a.get_long_help().or(a.get_help()));
    let defaults: Vec<String> = a
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
        .collect();
    if !defaults.is_empty() && takes_value(a) {
        help.push_str(&format!(" [default: {}]", defaults.join(", ")));
    }
    if let Some(env) = a.get_env() {
        help.push_str(&format!(" [env: {}]", env.to_string_lossy()));
    }
    if matches!(a.get_action(), ArgAction::Append) {
        help.push_str(" (may be given more than once)");
    }
    help.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn visible_args(cmd: &Command) -> Vec<&Arg> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_global_set())
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .collect()
}

fn synopsis(cmd: &Command, prefix: &str) -> String {
    let mut s = format!("\\fB{}\\fR", escape(prefix));
    for a in visible_args(cmd) {
        if a.is_positional() {
            let n = escape(&value_names(a));
            if a.is_required_set() {
                s.push_str(&format!(" \\fI{n}\\fR"));
            } else {
                s.push_str(&format!(" [\\fI{n}\\fR]"));
            }
        } else {
            let label = option_label(a);
            let label = label.split(", ").last().unwrap_or(&label).to_string();
            if a.is_required_set() {
                s.push_str(&format!(" {label}"));
            } else {
                s.push_str(&format!(" [{label}]"));
            }
        }
    }
    s
}

fn options(out: &mut String, args: &[&Arg]) {
    for a in args {
        out.push_str(".TP\n");
        if a.is_positional() {
            out.push_str(&format!("\\fI{}\\fR\n", escape(&value_names(a))));
        } else {
            out.push_str(&option_label(a));
            out.push('\n');
        }
        out.push_str(&escape(&arg_help(a)));
        out.push('\n');
    }
}

/// The man page of `cmd` in section `section`.
pub fn render(cmd: &Command, section: &str) -> String {
    let mut cmd = cmd.clone();
    cmd.build();
    let name = cmd.get_name().to_string();
    let version = cmd.get_version().unwrap_or("").to_string();
    let mut out = String::new();
    out.push_str(&format!(
        ".\\\" Generated from the command-line definition by `{name} --generate-man`; do not edit.\n"
    ));
    out.push_str(&format!(
        ".TH {} {section} \"\" \"{} {}\" \"KIWIspray\"\n",
        escape(&name.to_uppercase()),
        escape(&name),
        escape(&version)
    ));
    out.push_str(".SH NAME\n");
    out.push_str(&format!(
        "{} \\- {}\n",
        escape(&name),
        escape(&styled(cmd.get_about()))
    ));
    out.push_str(".SH SYNOPSIS\n");
    let subs: Vec<&Command> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    if subs.is_empty() {
        out.push_str(&synopsis(&cmd, &name));
        out.push('\n');
    } else {
        out.push_str(&format!(
            "\\fB{}\\fR [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]\n",
            escape(&name)
        ));
        for s in &subs {
            out.push_str(".br\n");
            out.push_str(&synopsis(s, &format!("{name} {}", s.get_name())));
            out.push('\n');
        }
    }
    out.push_str(".SH DESCRIPTION\n");
    paragraphs(&mut out, &styled(cmd.get_long_about().or(cmd.get_about())));
    let globals: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    let mut headings: Vec<Option<&str>> = Vec::new();
    for a in &globals {
        if !headings.contains(&a.get_help_heading()) {
            headings.push(a.get_help_heading());
        }
    }
    for h in headings {
        out.push_str(&format!(
            ".SH {}\n",
            escape(&h.unwrap_or("OPTIONS").to_uppercase())
        ));
        let group: Vec<&Arg> = globals
            .iter()
            .copied()
            .filter(|a| a.get_help_heading() == h)
            .collect();
        options(&mut out, &group);
    }
    if !subs.is_empty() {
        out.push_str(".SH COMMANDS\n");
        for s in &subs {
            out.push_str(&format!(".SS {}\n", escape(s.get_name())));
            out.push_str(&synopsis(s, &format!("{name} {}", s.get_name())));
            out.push('\n');
            paragraphs(&mut out, &styled(s.get_long_about().or(s.get_about())));
            let args = visible_args(s);
            if !args.is_empty() {
                out.push_str(".RS\n");
                options(&mut out, &args);
                out.push_str(".RE\n");
            }
        }
    }
    let after = styled(cmd.get_after_long_help().or(cmd.get_after_help()));
    if !after.trim().is_empty() {
        out.push_str(".SH NOTES\n");
        paragraphs(&mut out, &after);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_roff() {
        assert_eq!(escape(".x -y \\z\n'q"), "\\&.x \\-y \\ez\n\\&'q");
    }
}
