//! The adapters between a web server and [`crate::api`]: FastCGI (on a
//! listening socket passed as fd 0 by spawn-fcgi or systemd, or bound by the
//! handler itself) and plain CGI (one request from the environment and
//! stdin). Both build the same [`Request`] and write the same CGI response.
//!
//! A panic while answering a request is caught and answered with a 500; the
//! other requests go on.

use crate::api::{self, Request, Response, Service, MAX_BODY};
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Builds a request from CGI-style variables and a body reader. Each
/// variable is asked for once.
pub fn request_from(
    mut var: impl FnMut(&str) -> Option<String>,
    body: &mut dyn Read,
) -> Result<Request, Response> {
    let mut get = |k: &str| var(k).unwrap_or_default();
    let script = get("SCRIPT_NAME");
    let path_info = get("PATH_INFO");
    let document_uri = get("DOCUMENT_URI");
    let path = if !path_info.is_empty() {
        format!("{script}{path_info}")
    } else if !document_uri.is_empty() {
        document_uri
    } else if !script.is_empty() {
        script
    } else {
        let mut uri = get("REQUEST_URI");
        uri.truncate(uri.find('?').unwrap_or(uri.len()));
        uri
    };
    let mut req = Request {
        method: get("REQUEST_METHOD"),
        path,
        query: get("QUERY_STRING"),
        body: Vec::new(),
        content_type: get("CONTENT_TYPE"),
        remote: get("REMOTE_ADDR"),
        via: String::new(),
        forwarded_for: get("HTTP_X_FORWARDED_FOR"),
        real_ip: get("HTTP_X_REAL_IP"),
        host_header: get("HTTP_HOST"),
        server_addr: get("SERVER_ADDR"),
        server_port: get("SERVER_PORT"),
        redirect_status: get("REDIRECT_STATUS"),
    };
    req.method.make_ascii_uppercase();
    if req.query.contains('\u{FFFD}') {
        return Err(Response::error(400, "query string is not valid UTF-8"));
    }
    let length = get("CONTENT_LENGTH");
    let length: usize = if length.trim().is_empty() {
        0
    } else {
        length
            .trim()
            .parse()
            .map_err(|_| Response::error(400, "bad Content-Length"))?
    };
    if length > MAX_BODY {
        return Err(Response::error(
            413,
            format!("body of {length} bytes is larger than {MAX_BODY}"),
        ));
    }
    if length > 0 {
        let mut buf = Vec::with_capacity(length);
        body.take(length as u64)
            .read_to_end(&mut buf)
            .map_err(|e| Response::error(400, format!("cannot read the request body: {e}")))?;
        req.body = buf;
    }
    Ok(req)
}

/// Answers a request, turning a panic into a 500.
pub fn answer(service: &Service, req: &Request) -> Response {
    contain(req, || service.handle(req))
}

/// Runs `handle`; a panic becomes a logged 500.
fn contain(req: &Request, handle: impl FnOnce() -> Response) -> Response {
    match catch_unwind(AssertUnwindSafe(handle)) {
        Ok(r) => r,
        Err(_) => {
            api::log(&format!(
                "internal error answering {} {}; see the message above",
                req.method, req.path
            ));
            Response::error(500, "internal error; the request was not carried out")
        }
    }
}

/// The CGI variables the service reads.
const VARS: &[&str] = &[
    "SCRIPT_NAME",
    "PATH_INFO",
    "DOCUMENT_URI",
    "REQUEST_URI",
    "REQUEST_METHOD",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "REMOTE_ADDR",
    "HTTP_X_FORWARDED_FOR",
    "HTTP_X_REAL_IP",
    "HTTP_HOST",
    "SERVER_ADDR",
    "SERVER_PORT",
    "REDIRECT_STATUS",
];

/// Seconds a client is asked to wait before retrying when the handler (or,
/// with the shipped configurations, the web server in front of it) has no
/// free connection. A flood that fills every slot is usually over within a
/// second or two, and iPXE waits exactly this long before it asks again.
pub const RETRY_AFTER_SECONDS: u32 = 2;

/// The answer to a connection beyond `max_connections`: a 503 with
/// `Retry-After`, one line of text like every other error.
pub fn overload_response() -> Response {
    let mut r = Response::error(503, "busy, retry later");
    r.headers
        .push(("Retry-After", RETRY_AFTER_SECONDS.to_string()));
    r
}

/// Serves FastCGI on a listening socket until the process is killed.
pub fn serve_fastcgi(
    service: Arc<Service>,
    listener: std::os::unix::io::RawFd,
    max_connections: usize,
) {
    let limits = fastcgi::Limits {
        max_connections,
        overload_response: overload_response().to_cgi(),
        ..fastcgi::Limits::default()
    };
    fastcgi::run_raw_with(
        move |mut r: fastcgi::Request| {
            let mut vars: Vec<(&str, String)> = VARS
                .iter()
                .filter_map(|k| r.param(k).map(|v| (*k, v)))
                .collect();
            let lookup = |k: &str| {
                vars.iter_mut()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::mem::take(v))
            };
            let response = match request_from(lookup, &mut r.stdin()) {
                Ok(req) => answer(&service, &req),
                Err(resp) => resp,
            };
            let _ = r.stdout().write_all(&response.to_cgi());
        },
        listener,
        limits,
    );
}

/// Answers one CGI request from the environment and stdin on stdout.
pub fn serve_cgi(service: &Service) -> std::io::Result<()> {
    let mut stdin = std::io::stdin().lock();
    let response = match request_from(|k| std::env::var(k).ok(), &mut stdin) {
        Ok(req) => answer(service, &req),
        Err(resp) => resp,
    };
    // The process ends with this request: what it counted goes to the
    // shared file first, so that the next request (a process of its own)
    // sees it.
    if let Err(e) = crate::metrics::save(&service.metrics_file()) {
        api::log(&format!("cannot save metrics: {e}"));
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&response.to_cgi())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| owned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn a_panic_answers_500_and_the_next_request_is_served() {
        let req = Request {
            method: "GET".into(),
            path: "/bootstrap".into(),
            ..Request::default()
        };
        let r = contain(&req, || panic!("a bug"));
        assert_eq!(r.status, 500);
        assert!(r
            .to_cgi()
            .starts_with(b"Status: 500 Internal Server Error\r\n"));
        let r = contain(&req, || Response::text(200, "ok"));
        assert_eq!(r.status, 200);
    }

    #[test]
    fn the_overload_response_is_a_503_with_retry_after() {
        let cgi = String::from_utf8(overload_response().to_cgi()).unwrap();
        assert!(
            cgi.starts_with("Status: 503 Service Unavailable\r\n"),
            "{cgi}"
        );
        assert!(cgi.contains(&format!("\r\nRetry-After: {RETRY_AFTER_SECONDS}\r\n")));
        assert!(
            cgi.ends_with("\r\n\r\nkiwispray: busy, retry later\n"),
            "{cgi}"
        );
    }

    #[test]
    fn paths_from_nginx_lighttpd_and_cgi() {
        let mut empty: &[u8] = b"";
        let nginx = vars(&[("DOCUMENT_URI", "/bootstrap"), ("SCRIPT_NAME", "")]);
        assert_eq!(request_from(nginx, &mut empty).unwrap().path, "/bootstrap");
        let cgi = vars(&[("SCRIPT_NAME", "/cgi-bin/ks"), ("PATH_INFO", "/finish")]);
        assert_eq!(
            request_from(cgi, &mut empty).unwrap().path,
            "/cgi-bin/ks/finish"
        );
        let uri = vars(&[("REQUEST_URI", "/state?id=1")]);
        assert_eq!(request_from(uri, &mut empty).unwrap().path, "/state");
    }

    #[test]
    fn forwarding_headers_are_read_and_via_starts_empty() {
        let mut empty: &[u8] = b"";
        let v = vars(&[
            ("REMOTE_ADDR", "10.0.0.2"),
            ("HTTP_X_FORWARDED_FOR", "6.6.6.6, 10.20.0.100"),
            ("HTTP_X_REAL_IP", "10.20.0.100"),
        ]);
        let req = request_from(v, &mut empty).unwrap();
        assert_eq!(req.remote, "10.0.0.2");
        assert_eq!(req.forwarded_for, "6.6.6.6, 10.20.0.100");
        assert_eq!(req.real_ip, "10.20.0.100");
        assert_eq!(req.via, "");
        assert!(VARS.contains(&"HTTP_X_FORWARDED_FOR") && VARS.contains(&"HTTP_X_REAL_IP"));
    }

    #[test]
    fn bodies_are_bounded_by_content_length() {
        let mut body: &[u8] = b"mac=52-54-00-00-00-01&extra";
        let v = vars(&[("CONTENT_LENGTH", "20")]);
        assert_eq!(
            request_from(v, &mut body).unwrap().body,
            b"mac=52-54-00-00-00-0"
        );
        let mut empty: &[u8] = b"";
        let big = vars(&[("CONTENT_LENGTH", "104857600")]);
        assert_eq!(request_from(big, &mut empty).unwrap_err().status, 413);
        let bad = vars(&[("CONTENT_LENGTH", "-1")]);
        assert_eq!(request_from(bad, &mut empty).unwrap_err().status, 400);
    }
}
