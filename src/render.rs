//! Templates: the seed's `@name@` placeholders, rendered with `tinytemplate`
//! so that iPXE and shell syntax (`${var}`, `{a,b}`, functions) pass through
//! untouched and values are inserted verbatim, never HTML-escaped.
//!
//! A placeholder is `@path@` or `@path|filter@`, where `path` is a name or a
//! dotted path into nested objects (`@metadata.net.vlan@`) and `filter` is
//! one of:
//!
//! - `raw` (the default): the value as it is;
//! - `shell`: one shell word in single quotes, safe to paste into `sh`;
//! - `url`: percent-encoded, safe inside a URL query or path segment;
//! - `json`: a JSON literal;
//! - `ipxe`: the value as it is, if it is one safe word on an iPXE command
//!   line (no whitespace, control characters, quotes or any of
//!   `$ { } \ # & | ; < > ` and backquote); any other value fails the render;
//! - `grub`: the value for use inside GRUB single quotes (`'@x|grub@'`):
//!   each `'` becomes `'\''`, so nothing in it is expanded or ends the
//!   word; a value with control characters fails the render. Written inside
//!   quotes, a missing value (which stays literally in place) is harmless
//!   text too.
//!
//! A placeholder whose value does not exist (or is `null`) stays literally
//! in place, so templates can test for it. An `@` that does not start a
//! placeholder is plain text. A placeholder naming an unknown filter is an
//! error reported with the file's line and column.

use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tinytemplate::TinyTemplate;

/// How a value is written into the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Raw,
    Shell,
    Url,
    Json,
    Ipxe,
    Grub,
}

impl Filter {
    fn name(self) -> &'static str {
        match self {
            Filter::Raw => "raw",
            Filter::Shell => "shell",
            Filter::Url => "url",
            Filter::Json => "json",
            Filter::Ipxe => "ipxe",
            Filter::Grub => "grub",
        }
    }
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Text(String),
    Placeholder {
        /// The text as written, `@name|filter@`, kept for missing values.
        written: String,
        path: Vec<String>,
        filter: Filter,
    },
}

/// Why a template cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateError {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "template {}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for TemplateError {}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub path: PathBuf,
    pub segments: Vec<Segment>,
    /// The template in tinytemplate's syntax, built once: the text with
    /// `{` escaped, and `{ v.N | slot }` for each value of [`Slot`]s.
    source: Arc<str>,
    slots: Vec<Slot>,
}

/// What a value of the tinytemplate source stands for.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// Backslashes that end a text run (they would escape the tag after
    /// them), passed as a value.
    Text(String),
    /// The placeholder at this index of `segments`.
    Placeholder(usize),
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

impl Template {
    /// Parses template text. `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Template, TemplateError> {
        let mut segments = Vec::new();
        let mut text_start = 0;
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < bytes.len() {
            if bytes[i] != b'@' {
                i += 1;
                continue;
            }
            let rest = &text[i + 1..];
            let name_len = rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len());
            let name = &rest[..name_len];
            let valid_name = !name.is_empty()
                && !name.starts_with('.')
                && !name.ends_with('.')
                && !name.contains("..");
            if !valid_name {
                i += 1;
                continue;
            }
            let after = &rest[name_len..];
            let (filter, consumed) = if let Some(f) = after.strip_prefix('|') {
                let flen = f
                    .find(|c: char| !c.is_ascii_alphanumeric())
                    .unwrap_or(f.len());
                if !f[flen..].starts_with('@') || flen == 0 {
                    i += 1;
                    continue;
                }
                let filter = match &f[..flen] {
                    "raw" => Filter::Raw,
                    "shell" => Filter::Shell,
                    "url" => Filter::Url,
                    "json" => Filter::Json,
                    "ipxe" => Filter::Ipxe,
                    "grub" => Filter::Grub,
                    other => {
                        let (line, column) = position(text, i);
                        return Err(TemplateError {
                            path: path.to_path_buf(),
                            line,
                            column,
                            message: format!(
                                "unknown filter {other:?} in @{name}|{other}@ \
                                 (known: raw, shell, url, json, ipxe, grub)"
                            ),
                        });
                    }
                };
                (filter, 1 + flen + 1)
            } else if after.starts_with('@') {
                (Filter::Raw, 1)
            } else {
                i += 1;
                continue;
            };
            if text_start < i {
                segments.push(Segment::Text(text[text_start..i].to_string()));
            }
            let end = i + 1 + name_len + consumed;
            segments.push(Segment::Placeholder {
                written: text[i..end].to_string(),
                path: name.split('.').map(str::to_string).collect(),
                filter,
            });
            i = end;
            text_start = end;
        }
        if text_start < text.len() {
            segments.push(Segment::Text(text[text_start..].to_string()));
        }
        let (source, slots) = tinytemplate_source(&segments);
        let template = Template {
            path: path.to_path_buf(),
            segments,
            source: source.into(),
            slots,
        };
        // Compile once now so that any problem shows at load time.
        template
            .render(&Value::Null)
            .map_err(|message| TemplateError {
                path: path.to_path_buf(),
                line: 1,
                column: 1,
                message,
            })?;
        Ok(template)
    }

    /// The names the template's placeholders start with (`metadata` for
    /// `@metadata.rack@`), in order, repeated as often as they are used.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Placeholder { path, .. } => path.first().map(String::as_str),
            Segment::Text(_) => None,
        })
    }

    /// Whether a placeholder of the template starts with `name`.
    pub fn uses(&self, name: &str) -> bool {
        self.names().any(|n| n == name)
    }

    /// Renders the template with the values in `context` (a JSON object).
    pub fn render(&self, context: &Value) -> Result<String, String> {
        let slot =
            |filter: Filter, value: Value| Value::Array(vec![Value::from(filter.name()), value]);
        let values: Vec<Value> = self
            .slots
            .iter()
            .map(|s| match s {
                Slot::Text(t) => slot(Filter::Raw, Value::from(t.as_str())),
                Slot::Placeholder(i) => match &self.segments[*i] {
                    Segment::Placeholder {
                        written,
                        path,
                        filter,
                    } => match lookup(context, path) {
                        Some(v) => slot(*filter, v.clone()),
                        None => slot(Filter::Raw, Value::from(written.as_str())),
                    },
                    Segment::Text(t) => slot(Filter::Raw, Value::from(t.as_str())),
                },
            })
            .collect();
        let mut ctx = serde_json::Map::new();
        ctx.insert("v".into(), Value::Array(values));
        with_compiled(&self.source, |tt| tt.render("t", &Value::Object(ctx)))?
            .map_err(|e| format!("cannot render template: {e}"))
    }
}

/// The tinytemplate source of a template's segments and what each of its
/// values stands for.
fn tinytemplate_source(segments: &[Segment]) -> (String, Vec<Slot>) {
    let mut source = String::new();
    let mut slots = Vec::new();
    let mut push_slot = |source: &mut String, slot: Slot| {
        source.push_str(&format!("{{ v.{} | slot }}", slots.len()));
        slots.push(slot);
    };
    for (i, seg) in segments.iter().enumerate() {
        match seg {
            Segment::Text(text) => {
                // tinytemplate reads every `{`; `\{` is its literal brace.
                // Backslashes that end a text run would escape the value
                // tag after them, so they are passed as a value instead.
                let body = text.trim_end_matches('\\');
                let trailing = &text[body.len()..];
                source.push_str(&body.replace('{', "\\{"));
                if !trailing.is_empty() {
                    push_slot(&mut source, Slot::Text(trailing.to_string()));
                }
            }
            Segment::Placeholder { .. } => push_slot(&mut source, Slot::Placeholder(i)),
        }
    }
    (source, slots)
}

/// A compiled tinytemplate and the source it borrows.
struct Compiled {
    // Declared first: dropped before the source it points into.
    tt: TinyTemplate<'static>,
    source: Arc<str>,
}

/// How many compiled templates each thread keeps.
const COMPILED_PER_THREAD: usize = 32;

thread_local! {
    /// Templates compiled by this thread (a `TinyTemplate` can be neither
    /// shared nor sent between threads), most recently compiled last.
    static COMPILED: std::cell::RefCell<Vec<Compiled>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with `source` compiled, compiling it on this thread's first use.
fn with_compiled<R>(source: &Arc<str>, f: impl FnOnce(&TinyTemplate) -> R) -> Result<R, String> {
    COMPILED.with(|cell| {
        let mut compiled = cell.borrow_mut();
        let i = match compiled.iter().position(|c| Arc::ptr_eq(&c.source, source)) {
            Some(i) => i,
            None => {
                // SAFETY: the text lives as long as an `Arc` of it does; the
                // `Compiled` holds one and drops `tt`, the only borrower,
                // first. The `&'static` never leaves the `Compiled`.
                let text: &'static str = unsafe { &*Arc::as_ptr(source) };
                let mut tt = TinyTemplate::new();
                tt.set_default_formatter(&format_raw);
                tt.add_formatter("slot", format_slot);
                tt.add_template("t", text)
                    .map_err(|e| format!("cannot compile template: {e}"))?;
                if compiled.len() == COMPILED_PER_THREAD {
                    compiled.remove(0);
                }
                compiled.push(Compiled {
                    tt,
                    source: source.clone(),
                });
                compiled.len() - 1
            }
        };
        Ok(f(&compiled[i].tt))
    })
}

/// The formatter of every value: `[filter, value]`.
fn format_slot(value: &Value, out: &mut String) -> tinytemplate::error::Result<()> {
    let (filter, value) = match value.as_array().map(Vec::as_slice) {
        Some([Value::String(f), v]) => (f.as_str(), v),
        _ => return format_raw(value, out),
    };
    match filter {
        "shell" => format_shell(value, out),
        "url" => format_url(value, out),
        "json" => format_json(value, out),
        "ipxe" => format_ipxe(value, out),
        "grub" => format_grub(value, out),
        _ => format_raw(value, out),
    }
}

fn position(text: &str, byte: usize) -> (usize, usize) {
    let before = &text[..byte];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Looks up a dotted path; `None` for a missing value or `null`.
pub fn lookup<'a>(context: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = context;
    for step in path {
        v = match v {
            Value::Object(m) => m.get(step)?,
            Value::Array(a) => a.get(step.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    if v.is_null() {
        None
    } else {
        Some(v)
    }
}

/// The plain text of a value: strings as they are, everything else as JSON.
pub fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn format_raw(value: &Value, out: &mut String) -> tinytemplate::error::Result<()> {
    out.push_str(&plain(value));
    Ok(())
}

fn format_shell(value: &Value, out: &mut String) -> tinytemplate::error::Result<()> {
    out.push_str(&shell_quote(&plain(value)));
    Ok(())
}

fn format_url(value: &Value, out: &mut String) -> tinytemplate::error::Result<()> {
    out.push_str(&percent_encode(&plain(value)));
    Ok(())
}

fn format_json(value: &Value, out: &mut String) -> tinytemplate::error::Result<()> {
    out.push_str(&value.to_string());
    Ok(())
}

fn format_ipxe(value: &Value, out: &mut String) -> tinytemplate::error::Result<()> {
    let text = plain(value);
    if !ipxe_word_safe(&text) {
        return Err(tinytemplate::error::Error::GenericError {
            msg: format!(
                "{:?} is not one safe word for an iPXE command line (the ipxe filter)",
                text.chars().take(80).collect::<String>()
            ),
        });
    }
    out.push_str(&text);
    Ok(())
}

fn format_grub(value: &Value, out: &mut String) -> tinytemplate::error::Result<()> {
    let text = plain(value);
    match grub_quoted(&text) {
        Some(q) => {
            out.push_str(&q);
            Ok(())
        }
        None => Err(tinytemplate::error::Error::GenericError {
            msg: format!(
                "{:?} has control characters, which a GRUB script cannot carry (the grub filter)",
                text.chars().take(80).collect::<String>()
            ),
        }),
    }
}

/// `s` for use between GRUB's single quotes: `'` closes the quotes, adds
/// an escaped quote and opens them again (`'\''`); `None` if `s` has
/// control characters.
pub fn grub_quoted(s: &str) -> Option<String> {
    if s.chars().any(char::is_control) {
        return None;
    }
    Some(s.replace('\'', "'\\''"))
}

/// Whether `s` is one non-empty word that iPXE and a kernel command line
/// take literally: printable ASCII without whitespace, quotes, `${` (settings
/// expansion), `#` (comments), `&&`/`||`/`;` (command separators), or the
/// backslash, braces, backquote and angle brackets.
pub fn ipxe_word_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_graphic()
                && !matches!(
                    b,
                    b'$' | b'{'
                        | b'}'
                        | b'\\'
                        | b'#'
                        | b'&'
                        | b'|'
                        | b';'
                        | b'"'
                        | b'\''
                        | b'`'
                        | b'<'
                        | b'>'
                )
        })
}

/// One POSIX shell word that stands for exactly `s`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parsed templates, re-read when their file changes.
#[derive(Default)]
pub struct Templates {
    cache: Mutex<HashMap<PathBuf, (FileId, Loaded)>>,
}

type FileId = (u64, u64, u64, i64, i64);
type Loaded = Result<Arc<Template>, TemplateError>;

impl Templates {
    /// The template at `path`: `Ok(None)` if there is no such file.
    pub fn load(&self, path: &Path) -> Result<Option<Arc<Template>>, TemplateError> {
        let meta = match fs::metadata(path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(TemplateError {
                    path: path.to_path_buf(),
                    line: 0,
                    column: 0,
                    message: format!("cannot read: {e}"),
                })
            }
        };
        let id = (
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_id, result)) = cache.get(path) {
            if *cached_id == id {
                return result.clone().map(Some);
            }
        }
        let result = read_template(path).map(Arc::new);
        cache.insert(path.to_path_buf(), (id, result.clone()));
        result.map(Some)
    }
}

fn read_template(path: &Path) -> Result<Template, TemplateError> {
    let bytes = fs::read(path).map_err(|e| TemplateError {
        path: path.to_path_buf(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.as_bytes()[..valid]).into_owned();
        let (line, column) = position(&text, text.len());
        TemplateError {
            path: path.to_path_buf(),
            line,
            column,
            message: "not valid UTF-8".into(),
        }
    })?;
    Template::parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(text: &str, ctx: Value) -> String {
        Template::parse(Path::new("t.tmpl"), text)
            .unwrap()
            .render(&ctx)
            .unwrap()
    }

    #[test]
    fn ipxe_and_shell_syntax_pass_through() {
        let text = "#!ipxe\nchain ${base}/x?mac=${net0/mac:hexhyp} || goto fail\n\
                    f() { echo {a,b} \\{x\\} ; }\nid=@id@ \\@id@ end\\";
        let out = render(text, json!({"id": 7}));
        assert_eq!(
            render("a\\\\@id@ b\\\\\\{@id@", json!({"id": 1})),
            "a\\\\1 b\\\\\\{1"
        );
        assert_eq!(
            out,
            "#!ipxe\nchain ${base}/x?mac=${net0/mac:hexhyp} || goto fail\n\
             f() { echo {a,b} \\{x\\} ; }\nid=7 \\7 end\\"
        );
    }

    #[test]
    fn values_are_verbatim_not_html_escaped() {
        let out = render(
            "k=@v@ n=@n@ b=@b@",
            json!({"v": "a&b<c>\"'", "n": 3.5, "b": true}),
        );
        assert_eq!(out, "k=a&b<c>\"' n=3.5 b=true");
    }

    #[test]
    fn missing_values_stay_literal() {
        let out = render(
            "[ \"@metadata.role@\" = \"@metadata.role@\" ] && x=@nothing|shell@ @n@",
            json!({"metadata": {}, "n": null}),
        );
        assert_eq!(
            out,
            "[ \"@metadata.role@\" = \"@metadata.role@\" ] && x=@nothing|shell@ @n@"
        );
    }

    #[test]
    fn dotted_paths_and_filters() {
        let ctx =
            json!({"metadata": {"net": {"vlan": 12, "name": "it's a & b"}, "list": ["x", "y"]}});
        assert_eq!(render("@metadata.net.vlan@", ctx.clone()), "12");
        assert_eq!(render("@metadata.list.1@", ctx.clone()), "y");
        assert_eq!(
            render("echo @metadata.net.name|shell@", ctx.clone()),
            "echo 'it'\\''s a & b'"
        );
        assert_eq!(
            render("?n=@metadata.net.name|url@", ctx.clone()),
            "?n=it%27s%20a%20%26%20b"
        );
        assert_eq!(
            render("@metadata.net|json@", ctx.clone()),
            "{\"name\":\"it's a & b\",\"vlan\":12}"
        );
        assert_eq!(
            render("@metadata.net@", ctx),
            "{\"name\":\"it's a & b\",\"vlan\":12}"
        );
    }

    #[test]
    fn ipxe_filter_inserts_safe_words_and_refuses_the_rest() {
        let t = Template::parse(
            Path::new("t.tmpl"),
            "kernel k x=@metadata.d|ipxe@ @missing|ipxe@",
        )
        .unwrap();
        let ok = t
            .render(&json!({"metadata": {"d": "/dev/disk/by-id/nvme-X_1:2+3@4,5=6"}}))
            .unwrap();
        assert_eq!(
            ok,
            "kernel k x=/dev/disk/by-id/nvme-X_1:2+3@4,5=6 @missing|ipxe@"
        );
        for bad in [
            "",
            "a b",
            "a\tb",
            "a\nreboot",
            "${x}",
            "a||b",
            "a&&b",
            "a;b",
            "#x",
            "a'b",
            "a\"b",
            "a\\b",
            "a`b`",
            "é",
        ] {
            let err = t.render(&json!({"metadata": {"d": bad}})).unwrap_err();
            assert!(err.contains("iPXE"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn stray_at_signs_are_text() {
        let ctx = json!({"id": 1});
        assert_eq!(
            render("mail root@example.com @ @@ @id", ctx.clone()),
            "mail root@example.com @ @@ @id"
        );
        assert_eq!(render("a@id@b@id@", ctx.clone()), "a1b1");
        assert_eq!(render("x|y @id|@ @.id@", ctx), "x|y @id|@ @.id@");
    }

    #[test]
    fn unknown_filter_reports_position() {
        let err =
            Template::parse(Path::new("/r/t.tmpl"), "#!ipxe\necho ok\n  x @id|html@").unwrap_err();
        assert_eq!((err.line, err.column), (3, 5));
        assert!(
            err.to_string().starts_with("template /r/t.tmpl:3:5: "),
            "{err}"
        );
        assert!(err.message.contains("html"));
    }

    #[test]
    fn shell_quote_round_trips_through_sh() {
        let nasty = "a'b\"c $(rm -rf /) `x` \\ \n;&|";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(nasty)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), nasty);
    }

    #[test]
    fn template_cache_sees_changes_and_bad_utf8() {
        let dir = std::env::temp_dir().join(format!("ks-render-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.tmpl");
        let cache = Templates::default();
        assert!(cache.load(&p).unwrap().is_none());
        fs::write(&p, "one @id@").unwrap();
        assert_eq!(
            cache
                .load(&p)
                .unwrap()
                .unwrap()
                .render(&json!({"id": 1}))
                .unwrap(),
            "one 1"
        );
        fs::write(&p, "two, longer @id@").unwrap();
        assert_eq!(
            cache
                .load(&p)
                .unwrap()
                .unwrap()
                .render(&json!({"id": 1}))
                .unwrap(),
            "two, longer 1"
        );
        fs::write(&p, b"ok\nab\xffc").unwrap();
        let err = cache.load(&p).unwrap_err();
        assert_eq!((err.line, err.column), (2, 3));
        fs::remove_dir_all(&dir).unwrap();
    }
}
