//! `kiwispray-hosts check`: validates a deployment root and lists every
//! problem it finds, so an operator learns about a broken template or a
//! half-copied image before a machine boots into it. It reads the database
//! file itself (not through the store, which stops at the first error) and
//! looks at every template and image directory. A host in the state of an
//! attended image (one whose installer asks before it writes the disk, as
//! `import-image` found out) must get an install disk on its kernel line.
//! The boot files the dnsmasq configuration names (iPXE over TFTP, iPXE
//! over HTTP from the deployment root's `boot/`) must be there, and where
//! `boot/` holds the GRUB flavour's loaders, its templates, `grub.cfg` and
//! signed binaries too.

use super::{json_text, out, CheckArgs, Ctx, Exit, Result};
use crate::hosts::{keys_of, Host, Key, STATE_DISCOVER, STATE_FINISHED, STATE_NEW};
use crate::identity::parse_mac_list;
use crate::images::{check_install_device, verify_image, Checksum, ImageInfo, INSTALL_DEVICE_KEY};
use crate::render::Templates;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// What a check found.
#[derive(Default)]
struct Report {
    problems: Vec<String>,
    hosts: usize,
    images: usize,
    templates: usize,
}

impl Report {
    fn problem(&mut self, p: impl Into<String>) {
        self.problems.push(p.into());
    }
}

pub fn check(ctx: &Ctx, a: &CheckArgs) -> Result<Exit> {
    let mut r = Report::default();
    let hosts = check_database(ctx, &mut r);
    check_templates(ctx, &mut r);
    check_states(ctx, &hosts, &mut r);
    check_install_disks(ctx, &hosts, &mut r);
    check_images(ctx, a.deep, &mut r);
    check_runtime(ctx, &mut r);
    check_boot_files(ctx, &a.dnsmasq, &mut r);
    check_grub_files(ctx, &mut r);
    if a.json {
        out(&json_text(&json!({
            "ok": r.problems.is_empty(),
            "problems": r.problems,
            "hosts": r.hosts,
            "images": r.images,
            "templates": r.templates,
        })))?;
    } else {
        let mut s = String::new();
        for p in &r.problems {
            s.push_str(&format!("problem: {p}\n"));
        }
        s.push_str(&format!(
            "{}: {} hosts, {} images, {} templates checked{}\n",
            if r.problems.is_empty() {
                "ok".to_string()
            } else {
                format!("{} problem(s)", r.problems.len())
            },
            r.hosts,
            r.images,
            r.templates,
            if a.deep {
                ", image checksums verified"
            } else {
                ""
            }
        ));
        out(&s)?;
    }
    Ok(if r.problems.is_empty() {
        Exit::Ok
    } else {
        Exit::Problems
    })
}

fn check_database(ctx: &Ctx, r: &mut Report) -> Vec<Host> {
    let path = &ctx.config.database;
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            r.problem(format!("cannot read {}: {e}", path.display()));
            return Vec::new();
        }
    };
    if text.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    let hosts: Vec<Host> = match serde_json::from_slice(&text) {
        Ok(h) => h,
        Err(e) => {
            r.problem(format!(
                "{} does not parse at line {}, column {}: {}",
                path.display(),
                e.line(),
                e.column(),
                e.to_string()
                    .rsplit_once(" at line ")
                    .map_or(e.to_string(), |(m, _)| m.to_string())
            ));
            return Vec::new();
        }
    };
    r.hosts = hosts.len();
    let mut ids: HashMap<u64, usize> = HashMap::new();
    for h in &hosts {
        *ids.entry(h.id).or_default() += 1;
    }
    let mut dup: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    dup.sort();
    for (id, n) in dup {
        r.problem(format!(
            "host id {id} appears {n} times in {}",
            path.display()
        ));
    }
    let placeholders = ctx.config.placeholders();
    let mut owners: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for h in &hosts {
        let (_, bad) = parse_mac_list(&h.macs);
        for b in bad {
            r.problem(format!(
                "host {}: {b:?} in macs is not a valid MAC address",
                h.id
            ));
        }
        for k in keys_of(h, &placeholders) {
            let name = match &k {
                Key::Mac(m) => format!("MAC {m}"),
                other => other.to_string(),
            };
            let ids = owners.entry(name).or_default();
            if !ids.contains(&h.id) {
                ids.push(h.id);
            }
        }
        if keys_of(h, &placeholders).is_empty() {
            r.problem(format!(
                "host {}: no MAC, serial or UUID identifies it; it can never be recognised",
                h.id
            ));
        }
    }
    for (key, ids) in owners {
        if ids.len() > 1 {
            let list: Vec<String> = ids.iter().map(|i| format!("host {i}")).collect();
            r.problem(format!("{key} belongs to {}", list.join(" and ")));
        }
    }
    hosts
}

/// The templates of a directory: the files of every flavour's extension
/// (`.tmpl` for iPXE, `.grub` for GRUB).
fn tmpl_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| crate::flavour::by_extension(x).is_some())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn check_templates(ctx: &Ctx, r: &mut Report) {
    let tdir = ctx.config.templates_dir();
    if !tdir.is_dir() {
        r.problem(format!("{} is missing", tdir.display()));
        return;
    }
    for required in ["bootstrap.ipxe", "new.tmpl", "finished.tmpl"] {
        if !tdir.join(required).is_file() {
            r.problem(format!(
                "{} is missing; the boot service needs it",
                tdir.join(required).display()
            ));
        }
    }
    let mut files = tmpl_files(&tdir);
    if let Ok(rd) = fs::read_dir(ctx.config.images_dir()) {
        for e in rd.filter_map(|e| e.ok()) {
            if !e.file_name().to_string_lossy().starts_with('.') && e.path().is_dir() {
                files.extend(tmpl_files(&e.path()));
            }
        }
    }
    let templates = Templates::default();
    for f in files {
        r.templates += 1;
        if let Err(e) = templates.load(&f) {
            r.problem(e.to_string());
        } else if f.extension().is_some_and(|x| x == "grub") {
            if let Some(why) = grub_syntax(&f) {
                r.problem(format!(
                    "template {}: GRUB cannot parse it: {why}",
                    f.display()
                ));
            }
        }
    }
}

/// What GRUB's own parser (`grub-script-check`, package grub-common) says
/// against a GRUB script; `None` when it takes it or is not installed.
fn grub_syntax(path: &Path) -> Option<String> {
    let out = std::process::Command::new("grub-script-check")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    if out.status.success() {
        return None;
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
    )
}

fn check_states(ctx: &Ctx, hosts: &[Host], r: &mut Report) {
    let mut missing: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for h in hosts {
        if h.state.trim().is_empty() {
            r.problem(format!("host {} has no state", h.id));
            continue;
        }
        for s in h.state.split(',').map(str::trim) {
            if let Err(e) = crate::lifecycle::check_state_name(s) {
                r.problem(format!("host {}: {e}", h.id));
                continue;
            }
            if matches!(s, STATE_NEW | STATE_FINISHED) {
                continue;
            }
            if ctx.config.images_dir().join(s).is_dir()
                || ctx
                    .config
                    .templates_dir()
                    .join(format!("{s}.tmpl"))
                    .is_file()
            {
                continue;
            }
            missing.entry(s.to_string()).or_default().push(h.id);
        }
    }
    for (state, ids) in missing {
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        r.problem(format!(
            "state {state:?} is used by host(s) {} but has neither images/{state}/ nor templates/{state}.tmpl",
            list.join(", ")
        ));
    }
}

/// The boot template of image state `name`, as the boot service picks it.
fn boot_template(ctx: &Ctx, name: &str) -> Option<PathBuf> {
    [
        ctx.config.images_dir().join(name).join("host.tmpl"),
        ctx.config.templates_dir().join(format!("{name}.tmpl")),
        ctx.config.templates_dir().join("known_host.tmpl"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Every host's install disk has the shape of a device path, and every
/// host in the state of an attended image gets one on its kernel line
/// (`rd.kiwi.oem.installdevice=`): without it the installer stops at
/// "Destroying ALL data on <disk>, continue ?" and the machine waits.
fn check_install_disks(ctx: &Ctx, hosts: &[Host], r: &mut Report) {
    let templates = Templates::default();
    let mut infos: HashMap<String, Option<ImageInfo>> = HashMap::new();
    for h in hosts {
        // None: no disk given; Some(false): a bad one (reported here).
        let disk = match h.metadata.get(INSTALL_DEVICE_KEY) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(dev)) => match check_install_device(dev) {
                Ok(()) => Some(true),
                Err(e) => {
                    r.problem(format!("host {}: metadata {e}", h.id));
                    Some(false)
                }
            },
            Some(other) => {
                r.problem(format!(
                    "host {}: metadata {INSTALL_DEVICE_KEY} is {other}, not a device path",
                    h.id
                ));
                Some(false)
            }
        };
        if disk == Some(false) {
            continue;
        }
        let mut seen = Vec::new();
        for s in h.state.split(',').map(str::trim) {
            if seen.contains(&s)
                || matches!(s, STATE_NEW | STATE_FINISHED | STATE_DISCOVER)
                || crate::lifecycle::check_state_name(s).is_err()
            {
                continue;
            }
            seen.push(s);
            let info = infos
                .entry(s.to_string())
                .or_insert_with(|| ImageInfo::read(&ctx.config.images_dir().join(s)));
            if info.as_ref().and_then(|i| i.unattended) != Some(false) {
                continue;
            }
            let Some(path) = boot_template(ctx, s) else {
                continue; // reported by the image check
            };
            let Ok(Some(t)) = templates.load(&path) else {
                continue; // reported by the template check
            };
            let mut values = match h.to_value() {
                serde_json::Value::Object(m) => m,
                _ => serde_json::Map::new(),
            };
            values.remove("bootid");
            values.insert("state".into(), s.into());
            values.insert("chain".into(), h.state.clone().into());
            let text = match t.render(&serde_json::Value::Object(values)) {
                Ok(t) => t,
                Err(msg) => {
                    r.problem(format!(
                        "host {}: {} does not render for it: {msg}",
                        h.id,
                        path.display()
                    ));
                    continue;
                }
            };
            if !text.contains("rd.kiwi.oem.installdevice=/") && disk == Some(true) {
                r.problem(format!(
                    "host {} is in state {s}, an attended image, and has {INSTALL_DEVICE_KEY} \
                     metadata, but {} does not pass it (rd.kiwi.oem.installdevice=); \
                     import the image again with --force to regenerate its host.tmpl",
                    h.id,
                    path.display()
                ));
            } else if !text.contains("rd.kiwi.oem.installdevice=/") {
                r.problem(format!(
                    "host {} is in state {s}, but image {s} is attended (its installer asks \
                     \"Destroying ALL data on <disk>, continue ?\" and waits) and the host has no \
                     install disk: kiwispray-hosts set {} --meta-set {INSTALL_DEVICE_KEY}=/dev/disk/by-id/..., \
                     or rebuild the image with <oem-unattended>true</oem-unattended>",
                    h.id, h.id
                ));
            }
        }
    }
}

/// The files of image directories a rendered boot script refers to.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    kernels: Vec<String>,
    initrds: Vec<String>,
    images: Vec<String>,
    other: Vec<String>,
}

/// Substitutes the script's own `set NAME VALUE` variables.
fn expand(line: &str, vars: &HashMap<String, String>) -> String {
    let mut s = line.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("${{{k}}}"), v);
    }
    s
}

/// The `images/...` path a URL or relative path points to, if any.
fn image_path(token: &str) -> Option<String> {
    let t = token.split('?').next().unwrap_or(token);
    let i = t
        .find("/images/")
        .map(|i| i + 1)
        .or_else(|| t.starts_with("images/").then_some(0))?;
    let p = &t[i..];
    (p.len() > "images/".len() && !p.contains("${")).then(|| p.to_string())
}

fn script_refs(text: &str) -> Refs {
    let mut refs = Refs::default();
    let mut vars = HashMap::new();
    for raw in text.lines() {
        let line = expand(raw.trim(), &vars);
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"set") && words.len() >= 3 {
            vars.insert(words[1].to_string(), words[2..].join(" "));
            continue;
        }
        let cmd = words.first().copied().unwrap_or("");
        if matches!(cmd, "echo" | "prompt") || cmd.starts_with('#') {
            continue;
        }
        // The first non-option argument of kernel/initrd is what it loads.
        // (Option values such as `--name initrd` hold no slash.)
        let loaded = words
            .iter()
            .skip(1)
            .find(|w| !w.starts_with('-') && w.contains('/'))
            .copied();
        for (i, w) in words.iter().enumerate() {
            let value = w
                .split_once('=')
                .map_or(*w, |(k, v)| if k.contains('/') { w } else { v });
            let value = value.strip_prefix("live:").unwrap_or(value);
            let Some(p) = image_path(value).filter(|p| !p.ends_with('/')) else {
                continue;
            };
            if w.starts_with("rd.kiwi.install.image=") {
                refs.images.push(p);
            } else if i > 0 && Some(*w) == loaded && matches!(cmd, "kernel" | "chain" | "boot") {
                refs.kernels.push(p);
            } else if i > 0 && Some(*w) == loaded && matches!(cmd, "initrd" | "module" | "imgfetch")
            {
                refs.initrds.push(p);
            } else {
                refs.other.push(p);
            }
        }
    }
    refs
}

fn check_images(ctx: &Ctx, deep: bool, r: &mut Report) {
    let idir = ctx.config.images_dir();
    let mut entries: Vec<_> = match fs::read_dir(&idir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).collect(),
        Err(_) => return,
    };
    entries.sort_by_key(|e| e.file_name());
    let templates = Templates::default();
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".import-") || name.starts_with(".old-") {
            r.problem(format!(
                "{} is left over from an interrupted import; remove it",
                e.path().display()
            ));
            continue;
        }
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        r.images += 1;
        if let Err(msg) = crate::lifecycle::check_state_name(&name) {
            r.problem(format!("image directory {}: {msg}", e.path().display()));
            continue;
        }
        let Some(path) = boot_template(ctx, &name) else {
            r.problem(format!(
                "image {name} has no host.tmpl and there is no template to boot it"
            ));
            continue;
        };
        let Ok(Some(t)) = templates.load(&path) else {
            // Reported by the template check.
            continue;
        };
        let values = json!({"state": name, "chain": name});
        let text = match t.render(&values) {
            Ok(t) => t,
            Err(msg) => {
                r.problem(format!("{}: {msg}", path.display()));
                continue;
            }
        };
        let refs = script_refs(&text);
        let shown = path.display();
        if refs.kernels.is_empty() && refs.initrds.is_empty() && refs.images.is_empty() {
            continue;
        }
        if refs.kernels.is_empty() {
            r.problem(format!("{shown} loads no kernel from images/"));
        }
        let exists = |p: &str| ctx.config.root.join(p).is_file();
        for (what, list) in [
            ("installer kernel", &refs.kernels),
            ("initrd", &refs.initrds),
            ("image", &refs.images),
            ("file", &refs.other),
        ] {
            for p in list {
                if !exists(p) {
                    r.problem(format!(
                        "{shown} refers to the {what} {p}, which does not exist"
                    ));
                }
            }
        }
        for img in &refs.images {
            let Some(stem) = img.strip_suffix(".xz") else {
                r.problem(format!("{shown}: the image URL {img} does not end in .xz"));
                continue;
            };
            if img.matches(".xz").count() > 1 {
                r.problem(format!(
                    "{shown}: the image URL {img} contains \".xz\" more than once; the installer would derive wrong URLs"
                ));
            }
            let sums: Vec<String> = ["sha512", "sha256", "md5"]
                .iter()
                .map(|x| format!("{stem}.{x}"))
                .filter(|p| exists(p))
                .collect();
            let Some(sum_path) = sums.first() else {
                r.problem(format!(
                    "image {img} has no checksum file ({stem}.sha256, .sha512 or .md5)"
                ));
                continue;
            };
            if !exists(&format!("{stem}.initrd")) && !exists(&format!("{stem}.kernel")) {
                r.problem(format!(
                    "image {img}: the installer also fetches {stem}.kernel and {stem}.initrd, which are missing"
                ));
            }
            let sum = match fs::read_to_string(ctx.config.root.join(sum_path)) {
                Ok(t) => Checksum::parse(sum_path, &t),
                Err(e) => Err(format!("cannot read {sum_path}: {e}")),
            };
            match sum {
                Err(e) => r.problem(e),
                Ok(sum) if deep => {
                    if let Err(e) = verify_image(&ctx.config.root.join(img), &sum, ctx.progress) {
                        r.problem(e.to_string());
                    }
                }
                Ok(_) => {}
            }
        }
    }
}

/// Held and overdue hosts, and a runtime log that does not parse. Newly
/// overdue installs are recorded in the event log, once each.
fn check_runtime(ctx: &Ctx, r: &mut Report) {
    let store = ctx.store();
    if let Err(e) = crate::api::overdue::record_overdue(&store) {
        r.problem(e.to_string());
        return;
    }
    let snap = match store.snapshot() {
        Ok(s) => s,
        Err(e) => {
            r.problem(e.to_string());
            return;
        }
    };
    let now = crate::runtime::now();
    for (id, a) in crate::api::overdue::overdue(&snap.db, &snap.rt, now) {
        r.problem(format!(
            "host {id} is overdue: {} (since {})",
            crate::api::overdue::describe(&a, now),
            crate::events::rfc3339_secs(a.started)
        ));
    }
    let mut held: Vec<u64> = snap
        .rt
        .iter()
        .filter(|(id, rt)| rt.hold.is_some() && snap.db.contains(*id))
        .map(|(id, _)| id)
        .collect();
    held.sort_unstable();
    for id in held {
        if let Some(h) = &snap.runtime(id).hold {
            r.problem(format!(
                "host {id} is held ({}) since {}: {}; release it with kiwispray-hosts release {id}",
                h.cause.as_str(),
                crate::events::rfc3339_secs(h.since),
                h.reason
            ));
        }
    }
}

/// Where dnsmasq configurations are looked for when `--dnsmasq` names none.
const DNSMASQ_DIR: &str = "/etc/dnsmasq.d";

/// The boot files each configured boot path needs. Every entry of the
/// deployment root's `boot/` must be a readable file (a link into an iPXE
/// package that was removed dangles), and every boot file a dnsmasq
/// configuration names must exist: a plain name or a `tftp://` URL under
/// its `tftp-root` (when dnsmasq serves TFTP itself), an `http://` URL of
/// `/boot/...` under the deployment root. The configurations are those
/// given with `--dnsmasq`, else `/etc/dnsmasq.d/kiwispray*.conf`.
fn check_boot_files(ctx: &Ctx, given: &[PathBuf], r: &mut Report) {
    let boot = ctx.config.root.join("boot");
    for p in boot_entries(&boot) {
        if let Err(why) = servable(&p) {
            r.problem(format!(
                "{} {why}; the web server cannot serve it",
                p.display()
            ));
        }
    }
    let configs: Vec<PathBuf> = if given.is_empty() {
        let mut v: Vec<PathBuf> = fs::read_dir(DNSMASQ_DIR)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name().is_some_and(|n| {
                            let n = n.to_string_lossy();
                            n.starts_with("kiwispray") && n.ends_with(".conf")
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    } else {
        given.to_vec()
    };
    for conf in configs {
        let text = match fs::read_to_string(&conf) {
            Ok(t) => t,
            Err(e) => {
                r.problem(format!("cannot read {}: {e}", conf.display()));
                continue;
            }
        };
        for (line, file) in dnsmasq_boot_files(&text) {
            let (path, how) = match file {
                BootFile::Tftp(name) => match tftp_root(&text) {
                    Some(root) => (root.join(name.trim_start_matches('/')), "TFTP"),
                    // another TFTP server (dhcp-boot's server field) serves it
                    None => continue,
                },
                BootFile::Http(path) => match path.strip_prefix("/boot/") {
                    Some(rest) if !rest.is_empty() => (boot.join(rest), "HTTP"),
                    _ => continue,
                },
            };
            if let Err(why) = servable(&path) {
                r.problem(format!(
                    "{}:{line}: {} {why}; machines booting over {how} with this line cannot load iPXE",
                    conf.display(),
                    path.display()
                ));
            }
        }
    }
}

/// The entries of `boot/` and its directories (GRUB's `grub/`), hidden
/// ones left out, sorted.
fn boot_entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    let mut names: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    names.sort();
    for p in names {
        let real_dir = fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        if real_dir {
            out.extend(boot_entries(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The boot loaders of the GRUB flavour in `boot/`, with the machines
/// that load them.
const GRUB_LOADERS: [(&str, &str); 3] = [
    ("shimx64.efi", "x86-64 UEFI machines (the signed shim)"),
    ("grubx64.efi", "x86-64 UEFI machines"),
    ("grubaa64.efi", "ARM64 UEFI machines"),
];

/// The GRUB flavour, where it is configured (`boot/` holds a shim, a GRUB
/// or `grub/grub.cfg`): the templates a GRUB machine needs, `grub.cfg`
/// (the static `bootstrap.grub`), a signed GRUB beside a shim (shim
/// starts nothing unsigned), a signed shim, and a `host.grub` for every
/// imported image.
fn check_grub_files(ctx: &Ctx, r: &mut Report) {
    let boot = ctx.config.root.join("boot");
    let present = |name: &str| fs::symlink_metadata(boot.join(name)).is_ok();
    if !GRUB_LOADERS.iter().any(|(n, _)| present(n)) && !present("grub/grub.cfg") {
        return;
    }
    let tdir = ctx.config.templates_dir();
    for required in ["bootstrap.grub", "new.grub", "finished.grub"] {
        if !tdir.join(required).is_file() {
            r.problem(format!(
                "{} is missing; machines booting GRUB ({}) get no answer",
                tdir.join(required).display(),
                boot.display()
            ));
        }
    }
    let cfg = boot.join("grub/grub.cfg");
    if let Err(why) = servable(&cfg) {
        r.problem(format!(
            "{} {why}; GRUB reads it first (link it to ../../templates/bootstrap.grub)",
            cfg.display()
        ));
    }
    if present("shimx64.efi") {
        if !present("grubx64.efi") {
            r.problem(format!(
                "{} is missing: the shim in {} loads it from the same place",
                boot.join("grubx64.efi").display(),
                boot.display()
            ));
        }
        for name in ["shimx64.efi", "grubx64.efi"] {
            let p = boot.join(name);
            if servable(&p).is_ok() && !pe_signed(&p) {
                r.problem(format!(
                    "{} is not signed: under Secure Boot {} refuses it (use {})",
                    p.display(),
                    if name == "shimx64.efi" {
                        "the firmware"
                    } else {
                        "the shim"
                    },
                    if name == "shimx64.efi" {
                        "shimx64.efi.signed from shim-signed"
                    } else {
                        "grubnetx64.efi.signed from grub-efi-amd64-signed"
                    }
                ));
            }
        }
    }
    let Ok(rd) = fs::read_dir(ctx.config.images_dir()) else {
        return;
    };
    let mut missing: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|d| d.join("host.tmpl").is_file() && !d.join("host.grub").is_file())
        .filter_map(|d| Some(d.file_name()?.to_string_lossy().into_owned()))
        .collect();
    missing.sort();
    for name in missing {
        r.problem(format!(
            "image {name} has no host.grub: GRUB machines in its state get templates/known_host.grub \
             (the seed's file names); import it again with --force to write one"
        ));
    }
}

/// Whether a PE image (an EFI binary) carries an Authenticode signature:
/// its certificate table (data directory 4) is not empty.
fn pe_signed(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let Some(pe) = u32_at(0x3c).map(|v| v as usize) else {
        return false;
    };
    if bytes.get(..2) != Some(b"MZ") || bytes.get(pe..pe + 4) != Some(b"PE\0\0") {
        return false;
    }
    let opt = pe + 24;
    // The data directories follow the optional header's fixed part: 96
    // bytes in PE32, 112 in PE32+.
    let dirs = match u16_at(opt) {
        Some(0x10b) => opt + 96,
        Some(0x20b) => opt + 112,
        _ => return false,
    };
    let count = u32_at(dirs - 4).unwrap_or(0);
    count > 4 && u32_at(dirs + 4 * 8 + 4).is_some_and(|size| size > 0)
}

/// A file a server can hand out: it exists (links followed), is a regular
/// file and is not empty.
fn servable(p: &Path) -> std::result::Result<(), &'static str> {
    match fs::metadata(p) {
        Ok(m) if m.is_file() && m.len() > 0 => Ok(()),
        Ok(m) if m.is_file() => Err("is empty"),
        Ok(_) => Err("is not a file"),
        Err(_) if fs::symlink_metadata(p).is_ok() => Err("is a dangling link"),
        Err(_) => Err("is missing"),
    }
}

#[derive(Debug, PartialEq)]
enum BootFile {
    /// A file name or the path of a `tftp://` URL, relative to the TFTP root.
    Tftp(String),
    /// The path of an `http(s)://` URL.
    Http(String),
}

/// The `tftp-root` of a dnsmasq configuration that serves TFTP itself.
fn tftp_root(text: &str) -> Option<PathBuf> {
    let mut enabled = false;
    let mut root = None;
    for l in text.lines().map(str::trim) {
        if l == "enable-tftp" || l.starts_with("enable-tftp=") {
            enabled = true;
        } else if let Some(v) = l.strip_prefix("tftp-root=") {
            root = v.split(',').next().map(|d| PathBuf::from(d.trim()));
        }
    }
    root.filter(|_| enabled)
}

/// The comma-separated fields of a dnsmasq value, with `tag:`/`net:`
/// fields dropped and double quotes honoured.
fn dnsmasq_fields(v: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    for c in v.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            _ => fields.last_mut().unwrap().push(c),
        }
    }
    fields
        .into_iter()
        .map(|f| f.trim().to_string())
        .filter(|f| !f.starts_with("tag:") && !f.starts_with("net:"))
        .collect()
}

/// The boot files of a dnsmasq configuration with their line numbers:
/// `dhcp-boot=` file names and URLs, `pxe-service=` base names and
/// DHCPv6 boot file URLs (`option6:bootfile-url`, `option6:59`).
fn dnsmasq_boot_files(text: &str) -> Vec<(usize, BootFile)> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        let Some((key, value)) = l.split_once('=') else {
            continue;
        };
        let f = dnsmasq_fields(value);
        let file = match key.trim() {
            "dhcp-boot" => f.first().cloned(),
            // CSA, menu text, base name (or a boot service type number)
            "pxe-service" => f.get(2).filter(|b| b.parse::<u32>().is_err()).cloned(),
            "dhcp-option" | "dhcp-option-force" => match f.first().map(String::as_str) {
                Some("option6:bootfile-url" | "option6:59") => f.get(1).cloned(),
                _ => None,
            },
            _ => None,
        };
        let Some(file) = file.filter(|f| !f.is_empty()) else {
            continue;
        };
        let lower = file.to_ascii_lowercase();
        let entry = if lower.starts_with("http://") || lower.starts_with("https://") {
            match url::Url::parse(&file) {
                Ok(u) => BootFile::Http(u.path().to_string()),
                Err(_) => continue,
            }
        } else if lower.starts_with("tftp://") {
            match url::Url::parse(&file) {
                Ok(u) => BootFile::Tftp(u.path().to_string()),
                Err(_) => continue,
            }
        } else {
            BootFile::Tftp(file)
        };
        out.push((i + 1, entry));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_of_generated_and_shipped_scripts() {
        let text = "#!ipxe\nset ks-base http://1.2.3.4:5000/images/x\nimgfree\n\
                    kernel ${ks-base}/pxeboot.kernel initrd=pxeboot.initrd.xz rd.kiwi.install.image=${ks-base}/x.xz razorurl=http://1.2.3.4:5000/post-install?id=1 || goto f\n\
                    initrd --name initrd ${ks-base}/pxeboot.initrd.xz || goto f\nboot\n";
        let r = script_refs(text);
        assert_eq!(r.kernels, vec!["images/x/pxeboot.kernel"]);
        assert_eq!(r.initrds, vec!["images/x/pxeboot.initrd.xz"]);
        assert_eq!(r.images, vec!["images/x/x.xz"]);
        assert!(r.other.is_empty(), "{:?}", r.other);
        let live = script_refs(
            "kernel http://h/images/l/linux initrd=initrd root=live:http://h/images/l/l.iso\n",
        );
        assert_eq!(live.other, vec!["images/l/l.iso"]);
    }

    #[test]
    fn boot_files_of_the_shipped_dnsmasq_configs() {
        let conf = |f: &str| {
            fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("dnsmasq")
                    .join(f),
            )
            .unwrap()
        };
        let files = |f: &str| -> Vec<BootFile> {
            dnsmasq_boot_files(&conf(f))
                .into_iter()
                .map(|(_, b)| b)
                .collect()
        };
        let tftp = |s: &str| BootFile::Tftp(s.into());
        let http = |s: &str| BootFile::Http(s.into());
        assert_eq!(
            files("kiwispray.conf"),
            vec![
                tftp("undionly.kpxe"),
                tftp("snponly.efi"),
                http("/boot/snponly.efi"),
                http("/bootstrap.ipxe")
            ]
        );
        assert_eq!(
            tftp_root(&conf("kiwispray.conf")),
            Some("/usr/lib/ipxe".into())
        );
        assert_eq!(
            files("kiwispray-proxy.conf"),
            vec![
                tftp("undionly.kpxe"),
                tftp("snponly.efi"),
                tftp("snponly.efi"),
                http("/bootstrap.ipxe")
            ]
        );
        assert_eq!(
            files("kiwispray-ipv6.conf"),
            vec![
                tftp("/snponly.efi"),
                http("/boot/snponly.efi"),
                http("/bootstrap.ipxe")
            ]
        );
        assert_eq!(
            tftp_root("tftp-root=/srv/tftp\n"),
            None,
            "without enable-tftp"
        );
    }
}
