//! The operator's command line, `kiwispray-hosts`: the clap definition of
//! every command, the translation of the seed's `edit-host.py` flags, exit
//! codes and error reporting, and the dispatch to one file per command
//! (`list`, `show`, `add`, `set`, `remove`, `release`, `history`, `power`,
//! `reinstall`,
//! [`preview`] for `render`, [`check`]; imports in [`crate::images`]), with
//! what they share in [`hosts`] (naming hosts, checking edits) and
//! [`display`] (tables, JSON). Nothing below [`run`] sees clap or the
//! environment: commands get a resolved [`Ctx`].
//!
//! Every change to the database goes through [`crate::store::Store::modify`],
//! the locked, atomic path the handler uses, and records an event with cause
//! `cli`.

mod add;
pub mod check;
pub mod display;
mod history;
pub mod hosts;
mod import_inventory;
mod list;
pub mod man;
mod power;
pub mod preview;
mod reinstall;
mod release;
mod remove;
mod rollout;
mod set;
mod show;

use crate::config::Config;
use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};
use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit codes, documented in `--help` and the man page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// `check` found problems.
    Problems = 1,
    /// Bad usage or bad input (an invalid MAC, JSON, state, build ...).
    Usage = 2,
    /// No such host, file or image.
    NotFound = 3,
    /// The database or a file could not be read or written, or a tool failed.
    Io = 4,
    /// Refused: a MAC, serial or UUID belongs to another host, or an image
    /// exists and --force was not given.
    Conflict = 5,
}

/// The exit code table as it appears in `--help` and the man page.
pub const EXIT_CODES: &str = "Exit status:\n  \
    0  success\n  \
    1  check found problems\n  \
    2  bad usage or bad input (nothing was changed)\n  \
    3  no such host, file or image\n  \
    4  the database or a file could not be read or written, or a tool failed\n  \
    5  refused: a MAC, serial or UUID belongs to another host, or an image exists (use --force)";

/// An error of one command: printed once, on one line.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub exit: Exit,
    pub message: String,
}

impl Error {
    pub fn usage(m: impl Into<String>) -> Error {
        Error {
            exit: Exit::Usage,
            message: m.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> Error {
        Error {
            exit: Exit::NotFound,
            message: m.into(),
        }
    }
    pub fn io(m: impl Into<String>) -> Error {
        Error {
            exit: Exit::Io,
            message: m.into(),
        }
    }
    pub fn conflict(m: impl Into<String>) -> Error {
        Error {
            exit: Exit::Conflict,
            message: m.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Error {
        Error::io(e.to_string())
    }
}

impl From<crate::images::ImportError> for Error {
    fn from(e: crate::images::ImportError) -> Error {
        use crate::images::ImportError as I;
        let exit = match &e {
            I::Invalid(_) => Exit::Usage,
            I::NotFound(_) => Exit::NotFound,
            I::Exists(_) => Exit::Conflict,
            I::Io(_) => Exit::Io,
        };
        Error {
            exit,
            message: e.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

const AFTER_HELP: &str = "The deployment root is --root, else $KIWISPRAY_ROOT, else the current \
directory. A host is named by its id, a MAC, its serial or its UUID.\n\n\
Compatibility with edit-host.py: -l lists, -ll lists verbosely, -i ID shows a host and \
-i ID -s STATE -m JSON -n HOSTNAME changes it.";

#[derive(Parser, Debug)]
#[command(
    name = "kiwispray-hosts",
    version,
    about = "Manage the machines and images of a KIWIspray deployment",
    long_about = "Manage the machines and images of a KIWIspray deployment: list, add, \
                  change and remove hosts, preview what a machine boots next, check a \
                  deployment root, and import KIWI images and live ISOs.\n\n\
                  Every change goes through the same locked, atomic database code as the \
                  boot service, is safe while machines boot, and is recorded in the event \
                  log with cause \"cli\".",
    after_help = AFTER_HELP,
    after_long_help = format!("{AFTER_HELP}\n\n{EXIT_CODES}"),
    disable_help_subcommand = true,
    subcommand_required = false,
    arg_required_else_help = true
)]
pub struct Cli {
    /// Deployment root (holds known_hosts.json, images/, templates/).
    #[arg(long, global = true, value_name = "DIR", env = "KIWISPRAY_ROOT")]
    pub root: Option<PathBuf>,
    /// Settings file (default: <root>/kiwispray.json if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// List hosts (-ll: verbosely).
    #[arg(short = 'l', action = ArgAction::Count, help_heading = "edit-host.py compatibility")]
    pub compat_list: u8,
    /// The host to show, or to change with -s, -m, -n.
    #[arg(
        short = 'i',
        value_name = "ID",
        help_heading = "edit-host.py compatibility"
    )]
    pub compat_id: Option<String>,
    /// New state (with -i).
    #[arg(
        short = 's',
        value_name = "STATE",
        help_heading = "edit-host.py compatibility"
    )]
    pub compat_state: Option<String>,
    /// Metadata to merge, a JSON object (with -i).
    #[arg(
        short = 'm',
        value_name = "JSON",
        help_heading = "edit-host.py compatibility"
    )]
    pub compat_meta: Option<String>,
    /// New hostname (with -i).
    #[arg(
        short = 'n',
        value_name = "HOSTNAME",
        help_heading = "edit-host.py compatibility"
    )]
    pub compat_hostname: Option<String>,

    /// Print the man page (roff) and exit.
    #[arg(long, hide = true)]
    pub generate_man: bool,

    #[command(subcommand)]
    pub command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List hosts: id, hostname, state, serial and MACs.
    List(ListArgs),
    /// Show every field of one host, its metadata and its recent events.
    Show(ShowArgs),
    /// Register a machine before its first boot.
    Add(AddArgs),
    /// Change a host's state, hostname or metadata.
    Set(SetArgs),
    /// Remove a host from the database.
    Remove(RemoveArgs),
    /// Switch hosts on or off, power-cycle them, or ask their power, through their BMCs.
    #[command(
        long_about = "Switch hosts on or off, power-cycle them (on if they are off), or ask \
                      their power, through each host's BMC (set it with set HOST --bmc URL). \
                      Give the hosts, then the action: power web01 web02 cycle, or \
                      power --where 'metadata.rack=R7' status. The BMCs are asked in \
                      parallel, at most --jobs at once, each within --timeout. The credentials \
                      come from bmc-credentials.json (mode 0600) and never show in output. \
                      Prints a table of host, BMC and result (--json for scripts); each action \
                      is recorded in the event log with cause \"power\". Exit status 0 only \
                      if every host succeeded, else 4."
    )]
    Power(PowerArgs),
    /// Set hosts to an image and make them install it now: network boot once, power-cycle.
    #[command(
        long_about = "Reinstall hosts from the desk: set their state (with the same checks \
                      as set --state), ask each BMC for one network (PXE) boot (IPMI chassis \
                      bootdev pxe, with options=efiboot where the host last booted with UEFI; \
                      Redfish BootSourceOverrideEnabled Once, Target Pxe), and power-cycle it \
                      (on if it is off). Hosts without a BMC or credentials refuse the whole \
                      command before anything changes. A host whose BMC step fails has its \
                      state set back, and the table says so. Exit status 0 only if every host \
                      was kicked, else 4."
    )]
    Reinstall(ReinstallArgs),
    /// Release held hosts, so that their next boot installs again.
    #[command(
        long_about = "Release held hosts. A host is held when its install failed (/fail), \
                      when it booted the installer max_install_boots times without a /finish \
                      (a loop), or when its install ran past the deadline with hold_overdue \
                      set. A held host keeps its state chain and installs nothing; once \
                      released, its next boot starts a new install and the loop count starts \
                      anew. Fix the cause first (see kiwispray-hosts show HOST)."
    )]
    Release(ReleaseArgs),
    /// Print what /bootstrap (or /post-install) would serve a host now.
    #[command(
        long_about = "Print exactly what /bootstrap (or, with --post-install, /post-install) \
                      would serve the host right now, using the same templates in the same \
                      order as the boot service. Changes nothing: no new bootid, no event.\n\n\
                      A real install boot gives the host a fresh bootid; the preview shows the \
                      host's current one, or leaves @bootid@ as it is when there is none."
    )]
    Render(RenderArgs),
    /// Show the event log, newest last.
    History(HistoryArgs),
    /// Validate a deployment root; exit 1 with a list of problems.
    #[command(
        long_about = "Validate a deployment root and exit 1 with a list of problems if there \
                      are any. Checks that the database parses, ids are unique and no MAC, \
                      serial or UUID belongs to two hosts; every state in use has its image or \
                      template; every template parses; every image directory has the installer \
                      kernel, initrd, image and checksum its host.tmpl refers to; that every \
                      host's installdevice metadata is a device path; that no host is in the \
                      state of an attended image (one whose installer asks before it writes \
                      the disk) without an install disk; and, with --deep, that every image \
                      matches its checksum.\n\n\
                      Held hosts and installs past their deadline are problems too: each is \
                      named with its cause or how long it has been installing, and a newly \
                      overdue install is recorded in the event log (once)."
    )]
    Check(CheckArgs),
    /// Import a KIWI oem PXE build as images/<NAME>/.
    #[command(
        long_about = "Import a KIWI oem PXE build into images/<NAME>/ and write its host.tmpl.\n\n\
                      SOURCE is a *.install.tar, a *.install.tar.xz or a directory of the \
                      unpacked files. All KIWI naming generations are accepted: bare names \
                      (pxeboot.kernel, pxeboot.initrd.xz, <name>.md5), pxeboot.<P>.initrd.xz, \
                      and the current pxeboot.<P>.initrd with <P>.sha256 or .sha512 and \
                      <P>.config.bootoptions. The uncompressed image is checked against the \
                      checksum file (digest and size). The import is built in a hidden \
                      directory and moved into place at the end, so a failed import leaves \
                      nothing behind.\n\n\
                      The installer initrd's /.profile is read (xz, gzip, zstd, bzip2 or lz4 \
                      compressed cpio, early microcode allowed): without \
                      kiwi_oemunattended='true' (KIWI's <oem-unattended>) the installer asks \
                      before it writes the disk, and the import warns. What it found is kept \
                      in images/<NAME>/image.json for check. The generated host.tmpl passes \
                      rd.kiwi.oem.installdevice=<disk> to hosts whose metadata has \
                      installdevice (e.g. /dev/disk/by-id/...), which also skips the question."
    )]
    ImportImage(ImportImageArgs),
    /// Import a live ISO as images/<NAME>/ (needs xorriso).
    #[command(
        long_about = "Import a live ISO into images/<NAME>/: linux and initrd are taken from \
                      the ISO's /boot/<arch>/loader/, the ISO is copied beside them as \
                      <NAME>.iso, and host.tmpl boots it with root=live:<URL of the ISO>. \
                      Needs xorriso."
    )]
    ImportLiveIso(ImportLiveIsoArgs),
    /// Install the hosts a selector names in waves, stopping on failures.
    #[command(
        long_about = "Install the hosts --where selects in waves of --batch: each wave's \
                      states are set in one commit, then the command waits until every host of \
                      the wave has finished, failed (is held) or gone overdue, and starts the \
                      next. It stops once --max-failures hosts have failed, leaving the hosts \
                      not started untouched. Interrupted and run again (without --where, \
                      --state and --batch), it resumes where it stopped; rollout --status shows \
                      where it stands, rollout --cancel forgets it. Exit status 1 when it \
                      stopped on failures or ended with failed hosts."
    )]
    Rollout(RolloutArgs),
    /// Add and update hosts from a vendor's inventory (CSV or JSON).
    #[command(
        long_about = "Add and update hosts from an inventory file: CSV with a header row, or a \
                      JSON array of objects. Columns: mac (one or more, separated by ';'), serial, \
                      uuid, hostname, state, bmc and metadata.<path>. Each row is matched to an \
                      existing host by any of its MACs, its serial or its UUID and updates it; \
                      the other rows are added. The report lists added, updated, unchanged and \
                      refused rows with their line numbers and reasons. Any refused row (a key \
                      that belongs to another host, a bad MAC, an unknown state, a row that \
                      repeats another) writes nothing, unless --skip-bad. All the changes are \
                      one commit."
    )]
    ImportInventory(ImportInventoryArgs),
}

/// The hosts a command works on: HOST arguments, `--where` conditions, or
/// both (then the named hosts that match).
#[derive(Args, Debug, Clone, Default)]
pub struct Targets {
    /// The hosts: ids, MACs, serials or UUIDs.
    #[arg(value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Only hosts for which every condition holds, e.g. 'state=new
    /// metadata.rack=R7', 'hostname=web*', 'id=100-199', 'held', 'overdue',
    /// 'seen<1h' (see the man page). May be given more than once.
    #[arg(long = "where", value_name = "EXPR")]
    pub wheres: Vec<String>,
}

/// How a change to several hosts is confirmed.
#[derive(Args, Debug, Clone, Default)]
pub struct Confirm {
    /// Print the hosts and what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Change more than one host without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Also show all MACs, the UUID, when each host was last seen and
    /// with which platform, and the metadata.
    #[arg(short, long)]
    pub verbose: bool,
    /// Only hosts whose current state (first element of the chain) is
    /// STATE; `held` and `overdue` select held and overdue hosts.
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Only held hosts.
    #[arg(long)]
    pub held: bool,
    /// Only hosts for which every condition holds (see `set --where`).
    #[arg(long = "where", value_name = "EXPR")]
    pub wheres: Vec<String>,
    /// Only hosts whose install is overdue.
    #[arg(long)]
    pub overdue: bool,
    /// Print a JSON array of hosts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The host: id, MAC, serial or UUID.
    pub host: String,
    /// How many recent events to show.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub events: usize,
    /// Print the host and its events as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// A MAC address of the machine (repeat for more NICs).
    #[arg(long = "mac", value_name = "MAC")]
    pub macs: Vec<String>,
    /// The SMBIOS serial number.
    #[arg(long)]
    pub serial: Option<String>,
    /// The SMBIOS UUID.
    #[arg(long)]
    pub uuid: Option<String>,
    /// The hostname.
    #[arg(long)]
    pub hostname: Option<String>,
    /// The state or state chain (default: new).
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Metadata, a JSON object.
    #[arg(long, value_name = "JSON")]
    pub meta: Option<String>,
    /// The machine's BMC: ipmi://ADDRESS[:PORT] or
    /// redfish://ADDRESS[:PORT][/redfish/v1/Systems/ID].
    #[arg(long, value_name = "URL")]
    pub bmc: Option<String>,
    /// Print the new host as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    #[command(flatten)]
    pub targets: Targets,
    #[command(flatten)]
    pub confirm: Confirm,
    /// New state or state chain, e.g. image1 or wipe,image1. Each element
    /// must be new, discover, finished, or have images/<S>/ or
    /// templates/<S>.tmpl. A new state ends an install in progress (its
    /// bootid is used up) and starts the loop count anew; a hold stays
    /// until `release`.
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// New hostname.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Metadata to merge, a JSON object (objects merge, other values replace).
    #[arg(long, value_name = "JSON")]
    pub meta: Option<String>,
    /// Set one metadata value; KEY may be dotted (net.vlan=12). VALUE is
    /// JSON if it parses as JSON, else a string.
    #[arg(long = "meta-set", value_name = "KEY=VALUE")]
    pub meta_set: Vec<String>,
    /// Remove one metadata value; KEY may be dotted.
    #[arg(long = "meta-unset", value_name = "KEY")]
    pub meta_unset: Vec<String>,
    /// The machine's BMC: ipmi://ADDRESS[:PORT] or
    /// redfish://ADDRESS[:PORT][/redfish/v1/Systems/ID] (credentials go in
    /// bmc-credentials.json, never here).
    #[arg(long, value_name = "URL", conflicts_with = "no_bmc")]
    pub bmc: Option<String>,
    /// Forget the host's BMC.
    #[arg(long)]
    pub no_bmc: bool,
    /// Print the changed host as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How BMCs are driven.
#[derive(Args, Debug, Clone)]
pub struct BmcOpts {
    /// How many BMCs to talk to at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub jobs: usize,
    /// Seconds each host's BMC may take before it counts as failed.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub timeout: u64,
}

impl Default for BmcOpts {
    fn default() -> Self {
        BmcOpts {
            jobs: 8,
            timeout: 30,
        }
    }
}

#[derive(Args, Debug)]
pub struct PowerArgs {
    /// The hosts (ids, MACs, serials or UUIDs), then the action: on, off,
    /// cycle or status.
    #[arg(value_name = "HOST... ACTION", required = true)]
    pub words: Vec<String>,
    /// Only hosts for which every condition holds (see set --where).
    #[arg(long = "where", value_name = "EXPR")]
    pub wheres: Vec<String>,
    #[command(flatten)]
    pub confirm: Confirm,
    #[command(flatten)]
    pub bmc: BmcOpts,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ReinstallArgs {
    #[command(flatten)]
    pub targets: Targets,
    #[command(flatten)]
    pub confirm: Confirm,
    /// The state or state chain to install, e.g. an image name.
    #[arg(long, value_name = "STATE", required = true)]
    pub state: String,
    #[command(flatten)]
    pub bmc: BmcOpts,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub targets: Targets,
    #[command(flatten)]
    pub confirm: Confirm,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub targets: Targets,
    #[command(flatten)]
    pub confirm: Confirm,
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    #[command(flatten)]
    pub targets: Targets,
    /// Render the post-install script instead of the boot script.
    #[arg(long)]
    pub post_install: bool,
    /// What @SERVER_IP@ and @SERVER_PORT@ become (default: "server" in the
    /// settings, else this machine's first global address and port 5000).
    #[arg(long, value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// The boot loader whose script to render: ipxe (the default) or grub,
    /// as a machine names it in /bootstrap?loader=.
    #[arg(long, value_name = "LOADER", default_value = "ipxe")]
    pub loader: String,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Only the events of this host (id, MAC, serial or UUID; a removed
    /// host by its id).
    pub host: Option<String>,
    /// Only the last N events.
    #[arg(short = 'n', long, value_name = "N")]
    pub last: Option<usize>,
    /// Print a JSON array of events.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also decompress every image and compare it with its checksum (slow).
    #[arg(long)]
    pub deep: bool,
    /// Print the problems as a JSON array.
    #[arg(long)]
    pub json: bool,
    /// A dnsmasq configuration whose boot files (iPXE over TFTP or over
    /// HTTP from the root's boot/) must exist; repeatable. Default: the
    /// /etc/dnsmasq.d/kiwispray*.conf files.
    #[arg(long, value_name = "FILE")]
    pub dnsmasq: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ImportImageArgs {
    /// The image (and state) name: images/<NAME>/.
    pub name: String,
    /// A *.install.tar, *.install.tar.xz or a directory of its files.
    pub source: PathBuf,
    /// Replace an existing image of that name.
    #[arg(long)]
    pub force: bool,
    /// Extra kernel arguments for the installer, e.g. "console=ttyS0".
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub append: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RolloutArgs {
    /// Which hosts (see set --where); required to start a rollout.
    #[arg(long = "where", value_name = "EXPR")]
    pub wheres: Vec<String>,
    /// The state (or chain) to install.
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// How many hosts per wave.
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Stop once this many hosts have failed (default: never).
    #[arg(long, value_name = "K")]
    pub max_failures: Option<usize>,
    /// Seconds between looks at the database.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub poll: u64,
    /// Show the rollout in progress and exit.
    #[arg(long)]
    pub status: bool,
    /// Forget the rollout in progress (hosts are left as they are).
    #[arg(long)]
    pub cancel: bool,
    /// Start without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Kick each wave through its BMCs once its states are set: one
    /// network boot, then a power cycle (as reinstall does).
    #[arg(long)]
    pub power_cycle: bool,
    /// With --status, print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ImportInventoryArgs {
    /// The inventory: *.csv, or *.json (else detected from its first
    /// character).
    pub file: PathBuf,
    /// Print what would be added and updated; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Import the good rows even if some are refused.
    #[arg(long)]
    pub skip_bad: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ImportLiveIsoArgs {
    /// The image (and state) name: images/<NAME>/.
    pub name: String,
    /// The ISO file.
    pub iso: PathBuf,
    /// The architecture under /boot/ when the ISO has several.
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// Replace an existing image of that name.
    #[arg(long)]
    pub force: bool,
    /// Extra kernel arguments, e.g. "console=ttyS0".
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub append: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What every command works with: the resolved settings of the root.
pub struct Ctx {
    pub config: Config,
    /// Whether progress may be shown (stderr being a terminal is checked
    /// where it is drawn).
    pub progress: bool,
}

impl Ctx {
    pub fn store(&self) -> crate::store::Store {
        self.config.store()
    }
}

/// The clap definition, for `--help` and the man page.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Prints an error the way every error is printed: one line on stderr.
pub fn report(e: &Error) {
    let line: String = e
        .message
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    eprintln!("kiwispray-hosts: {line}");
}

/// Clap's error as one line.
fn clap_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    let line = parts.join("; ");
    let line = line.strip_prefix("error: ").unwrap_or(&line).to_string();
    format!("{line} (see --help)")
}

/// Runs the CLI with `args` (the program name first).
pub fn run(args: Vec<OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as K;
            return match e.kind() {
                K::DisplayHelp | K::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                K::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    ExitCode::from(Exit::Usage as u8)
                }
                _ => {
                    eprintln!("kiwispray-hosts: {}", clap_line(&e));
                    ExitCode::from(Exit::Usage as u8)
                }
            };
        }
    };
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            report(&e);
            ExitCode::from(e.exit as u8)
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
pub fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io(format!("cannot write to stdout: {e}"))),
    }
}

/// Pretty JSON with a final newline.
pub fn json_text(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into());
    s.push('\n');
    s
}

fn dispatch(cli: Cli) -> Result<Exit> {
    if cli.generate_man {
        out(&man::render(&command(), "1"))?;
        return Ok(Exit::Ok);
    }
    let root = cli.root.clone().unwrap_or_else(|| PathBuf::from("."));
    if !root.is_dir() {
        return Err(Error::not_found(format!(
            "deployment root {} is not a directory (use --root or KIWISPRAY_ROOT)",
            root.display()
        )));
    }
    let config = Config::load(&root, cli.config.as_deref()).map_err(Error::usage)?;
    let ctx = Ctx {
        config,
        progress: true,
    };
    let compat = cli.compat_list > 0
        || cli.compat_id.is_some()
        || cli.compat_state.is_some()
        || cli.compat_meta.is_some()
        || cli.compat_hostname.is_some();
    let command = match (cli.command, compat) {
        (Some(_), true) => {
            return Err(Error::usage(
                "the edit-host.py flags (-l, -i, -s, -m, -n) cannot be combined with a command",
            ))
        }
        (Some(c), false) => c,
        (None, true) => compat_command(
            cli.compat_list,
            cli.compat_id,
            cli.compat_state,
            cli.compat_meta,
            cli.compat_hostname,
        )?,
        (None, false) => return Err(Error::usage("no command given (see --help)")),
    };
    match command {
        Cmd::List(a) => list::list(&ctx, &a),
        Cmd::Show(a) => show::show(&ctx, &a),
        Cmd::Add(a) => add::add(&ctx, &a),
        Cmd::Set(a) => set::set(&ctx, &a),
        Cmd::Remove(a) => remove::remove(&ctx, &a),
        Cmd::Release(a) => release::release(&ctx, &a),
        Cmd::Power(a) => power::power(&ctx, &a),
        Cmd::Reinstall(a) => reinstall::reinstall(&ctx, &a),
        Cmd::History(a) => history::history(&ctx, &a),
        Cmd::Render(a) => preview::render(&ctx, &a),
        Cmd::Check(a) => check::check(&ctx, &a),
        Cmd::ImportImage(a) => import_image(&ctx, &a),
        Cmd::ImportLiveIso(a) => import_live_iso(&ctx, &a),
        Cmd::ImportInventory(a) => import_inventory::import_inventory(&ctx, &a),
        Cmd::Rollout(a) => rollout::rollout(&ctx, &a),
    }
}

/// Translates the seed's `edit-host.py` flags into a command.
fn compat_command(
    list: u8,
    id: Option<String>,
    state: Option<String>,
    meta: Option<String>,
    hostname: Option<String>,
) -> Result<Cmd> {
    let edits = state.is_some() || meta.is_some() || hostname.is_some();
    match (list, id) {
        (0, None) => Err(Error::usage(
            "-s, -m and -n need -i ID (the host to change)",
        )),
        (1..=2, None) if !edits => Ok(Cmd::List(ListArgs {
            verbose: list == 2,
            state: None,
            held: false,
            overdue: false,
            wheres: Vec::new(),
            json: false,
        })),
        (3.., None) => Err(Error::usage("-l may be given at most twice (-ll)")),
        (_, None) => Err(Error::usage(
            "-s, -m and -n need -i ID (the host to change)",
        )),
        (0, Some(host)) if !edits => Ok(Cmd::Show(ShowArgs {
            host,
            events: 10,
            json: false,
        })),
        (0, Some(host)) => Ok(Cmd::Set(SetArgs {
            targets: Targets {
                hosts: vec![host],
                wheres: Vec::new(),
            },
            confirm: Confirm::default(),
            state,
            hostname,
            meta,
            meta_set: Vec::new(),
            meta_unset: Vec::new(),
            bmc: None,
            no_bmc: false,
            json: false,
        })),
        (_, Some(_)) => Err(Error::usage("-l cannot be combined with -i")),
    }
}

fn imported_text(i: &crate::images::Imported, json: bool) -> String {
    if json {
        return json_text(&serde_json::json!({
            "name": i.name,
            "dir": i.dir,
            "kind": i.kind,
            "files": i.files,
            "replaced": i.replaced,
            "unattended": i.unattended,
            "warnings": i.warnings,
        }));
    }
    format!(
        "{} image {} ({}) into {}: {}\nset a host to it with: kiwispray-hosts set <host> --state {}\n",
        if i.replaced { "replaced" } else { "imported" },
        i.name,
        i.kind,
        i.dir.display(),
        i.files.join(", "),
        i.name
    )
}

fn import_image(ctx: &Ctx, a: &ImportImageArgs) -> Result<Exit> {
    let done = crate::images::import_image(
        &ctx.config.images_dir(),
        &a.name,
        &a.source,
        &a.append,
        a.force,
        ctx.progress,
    )?;
    for w in &done.warnings {
        eprintln!("kiwispray-hosts: warning: {w}");
    }
    out(&imported_text(&done, a.json))?;
    Ok(Exit::Ok)
}

fn import_live_iso(ctx: &Ctx, a: &ImportLiveIsoArgs) -> Result<Exit> {
    let done = crate::images::import_live_iso(
        &ctx.config.images_dir(),
        &a.name,
        &a.iso,
        a.arch.as_deref(),
        &a.append,
        a.force,
        ctx.progress,
    )?;
    out(&imported_text(&done, a.json))?;
    Ok(Exit::Ok)
}
