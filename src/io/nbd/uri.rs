//! NBD URIs, the subset blocksync accepts: `nbd://host[:port]/export` over TCP and
//! `nbd+unix:///export?socket=PATH` over a unix socket. TLS (`nbds://`) and the other
//! transports are refused by name, so the message says what is missing.

use crate::error::{Error, Kind, Result};
use crate::io::nbd::wire::MAX_STRING;
use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A host name or address (IPv6 without its brackets) and a port.
    Tcp { host: String, port: u16 },
    /// A unix socket.
    Unix(PathBuf),
}

/// A server and the export to open on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub address: Address,
    /// The export name; empty asks for the server's default export.
    pub export: String,
}

fn bad(text: &str, why: &str) -> Error {
    Error::new(
        Kind::Usage,
        format!(
            "bad NBD URI {:?}: {why} (expected nbd://HOST[:PORT]/EXPORT or \
             nbd+unix:///EXPORT?socket=PATH)",
            crate::error::harmless(text)
        ),
    )
}

impl Uri {
    /// Parses `text`; a malformed URI is a usage error that says what is wrong.
    pub fn parse(text: &str) -> Result<Uri> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| bad(text, "no scheme"))?;
        match scheme {
            "nbd" => Self::parse_tcp(text, rest),
            "nbd+unix" => Self::parse_unix(text, rest),
            "nbds" | "nbds+unix" => Err(bad(text, "TLS (nbds) is not supported")),
            _ => Err(bad(text, &format!("unsupported scheme {scheme:?}"))),
        }
    }

    /// An export on a unix socket.
    pub fn unix(socket: impl Into<PathBuf>, export: &str) -> Uri {
        Uri {
            address: Address::Unix(socket.into()),
            export: export.to_string(),
        }
    }

    fn parse_tcp(text: &str, rest: &str) -> Result<Uri> {
        if rest.contains('?') || rest.contains('#') {
            return Err(bad(text, "nbd:// takes no query"));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(bad(text, "user names are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad(text, "unclosed '[' in the host"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad(text, "junk after ']'"))?,
                    ),
                ),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad(text, "no host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad(text, &format!("bad port {p:?}")))?,
        };
        Ok(Uri {
            address: Address::Tcp {
                host: host.to_string(),
                port,
            },
            export: decode(text, path)?,
        })
    }

    fn parse_unix(text: &str, rest: &str) -> Result<Uri> {
        let Some(rest) = rest.strip_prefix('/') else {
            return Err(bad(
                text,
                "nbd+unix:// takes no host (write nbd+unix:///EXPORT)",
            ));
        };
        let (path, query) = rest
            .split_once('?')
            .ok_or_else(|| bad(text, "no ?socket=PATH"))?;
        let mut socket = None;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("socket", p)) if !p.is_empty() && socket.is_none() => {
                    socket = Some(decode(text, p)?)
                }
                Some(("socket", _)) => return Err(bad(text, "empty or repeated socket=")),
                _ => {
                    return Err(bad(text, &format!("unsupported query parameter {pair:?}")));
                }
            }
        }
        let socket = socket.ok_or_else(|| bad(text, "no ?socket=PATH"))?;
        Ok(Uri::unix(socket, &decode(text, path)?))
    }
}

/// Percent-decoding of one URI part; the result must be UTF-8 without NUL and within
/// the protocol's string limit.
fn decode(text: &str, part: &str) -> Result<String> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(text, "bad %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.contains(&0) || out.len() > MAX_STRING {
        return Err(bad(text, "NUL or longer than 4096 bytes"));
    }
    String::from_utf8(out).map_err(|_| bad(text, "not UTF-8 after %-decoding"))
}

impl fmt::Display for Uri {
    /// The URI as a user would write it (for messages; the export is not re-escaped).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Address::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Address::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> Uri {
        Uri {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn good_uris_parse() {
        assert_eq!(
            Uri::parse("nbd://h/e").unwrap(),
            tcp("h", DEFAULT_PORT, "e")
        );
        assert_eq!(Uri::parse("nbd://h:1234").unwrap(), tcp("h", 1234, ""));
        assert_eq!(
            Uri::parse("nbd://[::1]:99/a%20b").unwrap(),
            tcp("::1", 99, "a b")
        );
        assert_eq!(
            Uri::parse("nbd://[::1]/x").unwrap(),
            tcp("::1", DEFAULT_PORT, "x")
        );
        assert_eq!(
            Uri::parse("nbd+unix:///disk?socket=/run/q%2Bs.sock").unwrap(),
            Uri::unix("/run/q+s.sock", "disk")
        );
        assert_eq!(
            Uri::parse("nbd+unix:///?socket=/s").unwrap(),
            Uri::unix("/s", "")
        );
        let u = Uri::parse("nbd://[::1]:99/e").unwrap();
        assert_eq!(u.to_string(), "nbd://[::1]:99/e");
        assert_eq!(Uri::unix("/s", "e").to_string(), "nbd+unix:///e?socket=/s");
    }

    #[test]
    fn malformed_uris_say_why() {
        let why = |t: &str| Uri::parse(t).unwrap_err();
        for (text, says) in [
            ("/dev/sda", "no scheme"),
            ("http://h/e", "unsupported scheme"),
            ("nbds://h/e", "TLS"),
            ("nbd:///e", "no host"),
            ("nbd://h:0/e", "bad port"),
            ("nbd://h:99999/e", "bad port"),
            ("nbd://h:x/e", "bad port"),
            ("nbd://[::1/e", "unclosed"),
            ("nbd://[::1]x/e", "junk"),
            ("nbd://u@h/e", "user"),
            ("nbd://h/e?socket=/s", "no query"),
            ("nbd+unix://h/e?socket=/s", "no host"),
            ("nbd+unix:///e", "no ?socket"),
            ("nbd+unix:///e?sock=/s", "unsupported query"),
            ("nbd+unix:///e?socket=", "empty"),
            ("nbd+unix:///e?socket=/a&socket=/b", "repeated"),
            ("nbd://h/%zz", "escape"),
            ("nbd://h/%4", "escape"),
            ("nbd://h/a%00b", "NUL"),
            ("nbd://h/%ff", "UTF-8"),
        ] {
            let e = why(text);
            assert_eq!(e.kind, Kind::Usage, "{text}");
            assert!(e.message.contains(says), "{text}: {}", e.message);
        }
        let long = format!("nbd://h/{}", "a".repeat(MAX_STRING + 1));
        assert!(why(&long).message.contains("4096"));
    }
}
