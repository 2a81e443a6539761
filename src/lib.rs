//! KIWIspray deploys KIWI-built operating-system images to bare-metal
//! machines over iPXE. This library holds everything but the two thin
//! binaries: `kiwispray-fcgi` (the boot service behind a web server) and
//! `kiwispray-hosts` (the operator's CLI).
//!
//! - [`identity`]: MACs, serials and UUIDs a machine is recognised by;
//! - [`hosts`]: the host database in memory and its file format;
//! - [`runtime`]: what the service observed about each host (bootid,
//!   install attempts, last seen, hold), changed only by patches;
//! - [`store`]: the locked, atomic load/save path shared by handler and CLI;
//! - [`events`]: the append-only event log;
//! - [`lifecycle`]: what a machine boots next, as pure functions;
//! - [`select`]: the `--where` host selectors, as pure values;
//! - [`rollout`]: waves of installs and when to start or stop them;
//! - [`render`]: `@name@` templates rendered with tinytemplate;
//! - [`flavour`]: the boot loaders' script languages (iPXE, GRUB), chosen
//!   per request;
//! - [`api`]: the HTTP paths; [`fcgi`]: the FastCGI and CGI adapters;
//! - [`config`]: deployment settings; [`metrics`]: Prometheus counters kept
//!   across processes; [`view`]: the JSON form of a host (CLI and API).
//! - [`cli`]: the `kiwispray-hosts` commands; [`images`]: KIWI image and live ISO import;
//!   [`inventory`]: inventory import as a pure plan.
//! - [`tftp`]: the read-only TFTP front end of the boot service (for GRUB
//!   under Secure Boot).
//! - [`bmc`]: out-of-band power through BMCs (IPMI, Redfish) and their
//!   credentials.

pub mod api;
pub mod bmc;
pub mod cli;
pub mod config;
pub mod events;
pub mod fcgi;
pub mod flavour;
pub mod hosts;
pub mod identity;
pub mod images;
pub mod inventory;
pub mod lifecycle;
pub mod metrics;
pub mod render;
pub mod rollout;
pub mod runtime;
pub mod select;
pub mod store;
pub mod tftp;
pub mod view;
