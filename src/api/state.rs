//! `GET /state?id=N`: a host's state chain as plain text, for scripts in
//! an installer or an installed system. Changes nothing.

use super::{parse_id, Params, Response, Service};

impl Service {
    pub(super) fn state(&self, params: &Params) -> Result<Response, Response> {
        let id = parse_id(params).map_err(|e| Response::error(400, e))?;
        let snap = self.snapshot()?;
        let host = snap
            .get(id)
            .ok_or_else(|| Response::error(404, format!("no host with id {id}")))?;
        Ok(Response::text(200, host.state.clone()))
    }
}
