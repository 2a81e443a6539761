//! `GET /post-install?id=N&bootid=B`: the script the installed system runs
//! once after the install (fetched by `kiwispray-firstboot` from the
//! `razorurl=` kernel argument). It is rendered from the image's
//! `post_install.tmpl`, else `templates/post_install.tmpl`, and only for the
//! host's current install (its bootid). Changes nothing.
//!
//! The same rendering serves `kiwispray-hosts render --post-install` and
//! the boot preview, so what an operator previews is what a machine gets.

use super::{
    check_installing, id_and_bootid, list_paths, log, preview_request, Facts, Params, Request,
    Response, Service,
};
use crate::flavour::Flavour;
use crate::hosts::Host;
use crate::runtime::HostRuntime;

impl Service {
    pub(super) fn post_install(
        &self,
        req: &Request,
        params: &Params,
    ) -> Result<Response, Response> {
        let (id, bootid) = id_and_bootid(params)?;
        let snap = self.snapshot()?;
        let (host, rt) = check_installing(&snap.db, &snap.rt, id, &bootid)?;
        self.post_install_script(req, &host, &rt).inspect_err(|r| {
            if r.status == 500 {
                log(&format!(
                    "host {}: {}",
                    host.id,
                    String::from_utf8_lossy(&r.body).trim_end()
                ));
            }
        })
    }

    /// The post-install script of a host, by its current state. An unsafe
    /// state name is refused before any path is built from it.
    fn post_install_script(
        &self,
        req: &Request,
        host: &Host,
        rt: &HostRuntime,
    ) -> Result<Response, Response> {
        let candidates = self
            .config
            .post_install_templates(host.current_state())
            .map_err(|e| Response::error(400, e))?;
        let context =
            |t: &crate::render::Template| self.context(req, host, rt, None, None, Some(t));
        match self.render_first(&candidates, context) {
            Ok(Some(text)) => Ok(Response::text(200, text)),
            Ok(None) => Err(Response::error(
                404,
                format!("no post-install template ({})", list_paths(&candidates)),
            )),
            Err(msg) => Err(Response::error(500, msg)),
        }
    }

    /// What `/bootstrap` would serve `host` now, had it come in on
    /// `server_ip:server_port`, without changing anything (the bootid it
    /// shows is the current one, not a fresh one).
    pub fn preview_boot(
        &self,
        host: &Host,
        rt: &HostRuntime,
        server_ip: &str,
        server_port: &str,
        flavour: &dyn Flavour,
    ) -> Response {
        let req = preview_request(server_ip, server_port);
        self.boot_script(&req, host, rt, &Facts::default(), flavour)
    }

    /// What `/post-install` serves `host` while it is being installed.
    pub fn preview_post_install(
        &self,
        host: &Host,
        rt: &HostRuntime,
        server_ip: &str,
        server_port: &str,
    ) -> Result<Response, Response> {
        let req = preview_request(server_ip, server_port);
        self.post_install_script(&req, host, rt)
    }
}
