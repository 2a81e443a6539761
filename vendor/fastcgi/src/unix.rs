////////////////////////////////////////////////////////////////////////////////
//                                                                            //
//  Copyright (c) 2015 Mohd Tarmizi Mohd Affandi                              //
//                                                                            //
//  Permission is hereby granted, free of charge, to any person obtaining a   //
//  copy of this software and associated documentation files (the             //
//  "Software"), to deal in the Software without restriction, including       //
//  without limitation the rights to use, copy, modify, merge, publish,       //
//  distribute, sublicense, and/or sell copies of the Software, and to        //
//  permit persons to whom the Software is furnished to do so, subject to     //
//  the following conditions:                                                 //
//                                                                            //
//  The above copyright notice and this permission notice shall be included   //
//  in all copies or substantial portions of the Software.                    //
//                                                                            //
//  THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS   //
//  OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF                //
//  MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.    //
//  IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY      //
//  CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,      //
//  TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE         //
//  SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.                    //
//                                                                            //
////////////////////////////////////////////////////////////////////////////////

use libc as c;
use std::io::{self, IoSlice, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::io::RawFd;
use std::ptr;
use std::time::{Duration, Instant};

use crate::Backoff;

const LISTENSOCK_FILENO: c::c_int = 0;

/// Per-read timeout used while draining a socket before closing it.
const DRAIN_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound on the total time spent draining a socket before closing it.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);
/// Upper bound on the number of bytes discarded while draining.
const DRAIN_MAX_BYTES: usize = 256 * 1024;
/// Largest number of buffers handed to one `writev` call (POSIX guarantees
/// at least 16, every supported system allows 1024).
const MAX_IOVECS: usize = 1024;

pub struct Transport {
    inner: c::c_int,
}

impl Transport {
    pub fn new() -> Self {
        Self::from_raw_fd(LISTENSOCK_FILENO)
    }

    pub fn from_raw_fd(raw_fd: RawFd) -> Self {
        Transport { inner: raw_fd }
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub fn accept(&mut self) -> io::Result<Socket> {
        let res = unsafe {
            c::accept4(
                self.inner,
                ptr::null_mut(),
                ptr::null_mut(),
                c::SOCK_CLOEXEC,
            )
        };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(Socket::new(res))
        }
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub fn accept(&mut self) -> io::Result<Socket> {
        let res = unsafe { c::accept(self.inner, ptr::null_mut(), ptr::null_mut()) };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            unsafe {
                c::fcntl(res, c::F_SETFD, c::FD_CLOEXEC);
            }
            Ok(Socket::new(res))
        }
    }
}

/// Decides how the accept loop reacts to an `accept` error.
pub fn accept_backoff(err: &io::Error) -> Backoff {
    match err.kind() {
        io::ErrorKind::Interrupted => return Backoff::quiet(None),
        // Non-blocking listener with nothing pending: poll gently.
        io::ErrorKind::WouldBlock => return Backoff::quiet(Some(Duration::from_millis(10))),
        _ => {}
    }
    match err.raw_os_error() {
        // Out of descriptors or memory: retrying at once would spin.
        Some(c::EMFILE | c::ENFILE | c::ENOMEM | c::ENOBUFS) => {
            Backoff::logged(Some(Duration::from_millis(100)))
        }
        // Errors that concern only the connection being accepted.
        Some(
            c::ECONNABORTED
            | c::ECONNRESET
            | c::EPROTO
            | c::EPERM
            | c::ETIMEDOUT
            | c::ENETDOWN
            | c::ENETUNREACH
            | c::EHOSTDOWN
            | c::EHOSTUNREACH
            | c::ENOPROTOOPT
            | c::EOPNOTSUPP,
        ) => Backoff::logged(None),
        // The listening descriptor itself is unusable; do not spin on it.
        Some(c::EBADF | c::ENOTSOCK | c::EINVAL | c::EFAULT) => {
            Backoff::logged(Some(Duration::from_secs(1)))
        }
        _ => Backoff::logged(Some(Duration::from_millis(100))),
    }
}

pub struct Socket {
    inner: c::c_int,
    drain: bool,
}

impl Socket {
    fn new(fd: c::c_int) -> Self {
        Socket {
            inner: fd,
            drain: true,
        }
    }

    #[cfg(test)]
    pub fn from_raw_fd(fd: RawFd) -> Self {
        Self::new(fd)
    }

    /// Whether dropping the socket should shut down the write side and
    /// discard (a bounded amount of) pending input before closing, so that
    /// the peer does not get a reset that could destroy the last response.
    pub fn set_drain(&mut self, drain: bool) {
        self.drain = drain;
    }

    /// Sets SO_RCVTIMEO and SO_SNDTIMEO. `None` or zero disables them.
    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_timeout(c::SO_RCVTIMEO, timeout)?;
        self.set_timeout(c::SO_SNDTIMEO, timeout)
    }

    fn set_timeout(&self, option: c::c_int, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(d) if d > Duration::ZERO => {
                let secs = d.as_secs().min(c::time_t::MAX as u64) as c::time_t;
                let mut usecs = d.subsec_micros() as c::suseconds_t;
                if secs == 0 && usecs == 0 {
                    // Zero would mean "no timeout".
                    usecs = 1;
                }
                c::timeval {
                    tv_sec: secs,
                    tv_usec: usecs,
                }
            }
            _ => c::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        let res = unsafe {
            c::setsockopt(
                self.inner,
                c::SOL_SOCKET,
                option,
                &tv as *const c::timeval as *const c::c_void,
                mem::size_of::<c::timeval>() as c::socklen_t,
            )
        };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn peer(&self) -> io::Result<String> {
        unsafe {
            let mut ss = mem::zeroed::<c::sockaddr_storage>();
            let mut len = mem::size_of::<c::sockaddr_storage>() as c::socklen_t;
            let res = c::getpeername(
                self.inner,
                &mut ss as *mut c::sockaddr_storage as *mut c::sockaddr,
                &mut len,
            );
            if res == -1 {
                return Err(io::Error::last_os_error());
            }
            match ss.ss_family as c::c_int {
                c::AF_INET => {
                    let sin = &*(&ss as *const c::sockaddr_storage as *const c::sockaddr_in);
                    Ok(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).to_string())
                }
                c::AF_INET6 => {
                    let sin6 = &*(&ss as *const c::sockaddr_storage as *const c::sockaddr_in6);
                    let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    match ip.to_ipv4_mapped() {
                        Some(v4) => Ok(v4.to_string()),
                        None => Ok(ip.to_string()),
                    }
                }
                c::AF_UNIX => Ok(String::new()),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Unsupported FastCGI socket",
                )),
            }
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if self.drain {
            unsafe {
                c::shutdown(self.inner, c::SHUT_WR);
            }
            // Bounded drain: a peer that never closes, or keeps sending,
            // cannot hold the thread here.
            let _ = self.set_timeout(c::SO_RCVTIMEO, Some(DRAIN_READ_TIMEOUT));
            let start = Instant::now();
            let mut buf = [0u8; 4096];
            let mut total = 0;
            while total < DRAIN_MAX_BYTES && start.elapsed() < DRAIN_DEADLINE {
                match (&*self).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n,
                    Err(ref e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        unsafe {
            c::close(self.inner);
        }
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let res = unsafe {
            c::read(
                self.inner,
                buf.as_mut_ptr() as *mut c::c_void,
                buf.len() as c::size_t,
            )
        };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res as usize)
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let res = unsafe {
            c::write(
                self.inner,
                buf.as_ptr() as *const c::c_void,
                buf.len() as c::size_t,
            )
        };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res as usize)
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // IoSlice is guaranteed to be ABI compatible with struct iovec.
        let res = unsafe {
            c::writev(
                self.inner,
                bufs.as_ptr() as *const c::iovec,
                bufs.len().min(MAX_IOVECS) as c::c_int,
            )
        };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}
