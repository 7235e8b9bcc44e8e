//! The fixed newstyle handshake: structured replies, the metadata contexts asked for,
//! then NBD_OPT_GO with a request for the block sizes. Every option reply is read
//! through one bounded reader, and every refusal becomes a message naming the export.

use crate::error::{Error, Kind, Result, peer_text};
use crate::io::nbd::wire::{self, Info};
use std::io::{Read, Write};

/// A metadata context a client can ask the server to report in block status.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Context {
    /// `base:allocation`: holes ([`Extent::is_hole`](super::Extent::is_hole)) and
    /// zeroes ([`Extent::is_zero`](super::Extent::is_zero)).
    Allocation,
    /// `qemu:dirty-bitmap:NAME`: the extents the bitmap marks dirty
    /// ([`Extent::is_dirty`](super::Extent::is_dirty)).
    DirtyBitmap(String),
}

impl Context {
    /// The name the protocol uses.
    pub fn name(&self) -> String {
        match self {
            Context::Allocation => "base:allocation".to_string(),
            Context::DirtyBitmap(b) => format!("qemu:dirty-bitmap:{b}"),
        }
    }
}

/// What the export allows, from its transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags {
    pub read_only: bool,
    pub can_flush: bool,
    pub can_fua: bool,
    pub rotational: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub can_fast_zero: bool,
    pub can_multi_conn: bool,
}

impl Flags {
    fn from_bits(bits: u16) -> Flags {
        let has = |f: u16| bits & f != 0;
        Flags {
            read_only: has(wire::TFLAG_READ_ONLY),
            can_flush: has(wire::TFLAG_SEND_FLUSH),
            can_fua: has(wire::TFLAG_SEND_FUA),
            rotational: has(wire::TFLAG_ROTATIONAL),
            can_trim: has(wire::TFLAG_SEND_TRIM),
            can_write_zeroes: has(wire::TFLAG_SEND_WRITE_ZEROES),
            can_fast_zero: has(wire::TFLAG_SEND_FAST_ZERO),
            can_multi_conn: has(wire::TFLAG_CAN_MULTI_CONN),
        }
    }
}

/// The server's block size constraints, or the protocol's defaults when it sent none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Offsets and lengths must be multiples of this.
    pub min: u32,
    /// Requests of this size (or multiples) are efficient.
    pub preferred: u32,
    /// The largest payload of one request.
    pub max: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        }
    }
}

/// What the handshake settled.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub size: u64,
    pub flags: Flags,
    pub sizes: BlockSizes,
    pub structured: bool,
    /// The contexts asked for, each with the id the server gave it.
    pub contexts: Vec<(Context, u32)>,
}

/// Most replies to one option: more is a server looping, not information.
const MAX_REPLIES: usize = 64;

/// The handshake over one stream, with what its messages name.
struct Hs<'a, S> {
    s: &'a mut S,
    /// "NBD export 'x' at URI", for messages.
    who: String,
    /// The side the export is on, for errors that are not protocol violations.
    role: Kind,
}

impl<S: Read + Write> Hs<'_, S> {
    fn io(&self, e: std::io::Error) -> Error {
        Error::new(
            self.role,
            format!(
                "{}: the connection failed during the handshake: {}",
                self.who,
                crate::error::os_text(&e)
            ),
        )
    }

    fn protocol(&self, why: impl std::fmt::Display) -> Error {
        Error::new(Kind::Protocol, format!("{}: {why}", self.who))
    }

    fn read<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.s.read_exact(&mut b).map_err(|e| self.io(e))?;
        Ok(b)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.s.write_all(bytes).map_err(|e| self.io(e))
    }

    /// One reply to `asked`: its type and payload (at most 64 KiB).
    fn reply(&mut self, asked: u32) -> Result<(u32, Vec<u8>)> {
        let header = self.read::<20>()?;
        let h = wire::option_reply(&header, asked).map_err(|w| self.protocol(w))?;
        let mut payload = vec![0u8; h.len as usize];
        self.s.read_exact(&mut payload).map_err(|e| self.io(e))?;
        Ok((h.kind, payload))
    }

    /// An option error reply as a message: what was refused, why, and the server's text.
    fn refused(&self, what: &str, kind: u32, payload: &[u8]) -> Error {
        let text = peer_text(&String::from_utf8_lossy(payload));
        let says = if text.is_empty() {
            String::new()
        } else {
            format!(" (server says: {text})")
        };
        let why = wire::option_error_name(kind);
        Error::new(self.role, format!("{}: {what}: {why}{says}", self.who))
    }

    fn greet(&mut self) -> Result<()> {
        let magic = u64::from_be_bytes(self.read::<8>()?);
        if magic != wire::NBDMAGIC {
            return Err(self.protocol("not an NBD server (bad greeting)"));
        }
        match u64::from_be_bytes(self.read::<8>()?) {
            wire::IHAVEOPT => {}
            wire::OLDSTYLE => return Err(self.protocol("oldstyle NBD servers are not supported")),
            m => return Err(self.protocol(format!("bad handshake magic {m:#x}"))),
        }
        let flags = u16::from_be_bytes(self.read::<2>()?);
        if flags & wire::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("the server lacks fixed newstyle negotiation"));
        }
        let mut ours = wire::FLAG_C_FIXED_NEWSTYLE;
        if flags & wire::FLAG_NO_ZEROES != 0 {
            ours |= wire::FLAG_C_NO_ZEROES;
        }
        self.send(&ours.to_be_bytes())
    }

    /// Structured replies, if the server has them (older servers answer "unsupported").
    fn structured(&mut self) -> Result<bool> {
        self.send(&wire::option(wire::OPT_STRUCTURED_REPLY, &[]))?;
        match self.reply(wire::OPT_STRUCTURED_REPLY)? {
            (wire::REP_ACK, _) => Ok(true),
            (k, _) if k & wire::REP_ERR != 0 => Ok(false),
            (k, _) => Err(self.protocol(format!("unexpected reply {k} to structured replies"))),
        }
    }

    fn meta_contexts(&mut self, export: &str, want: &[Context]) -> Result<Vec<(Context, u32)>> {
        let mut data = Vec::new();
        wire::put_string(&mut data, export);
        data.extend_from_slice(&(want.len() as u32).to_be_bytes());
        for c in want {
            wire::put_string(&mut data, &c.name());
        }
        self.send(&wire::option(wire::OPT_SET_META_CONTEXT, &data))?;
        let mut got: Vec<(Context, u32)> = Vec::new();
        for _ in 0..MAX_REPLIES {
            let (kind, payload) = self.reply(wire::OPT_SET_META_CONTEXT)?;
            match kind {
                wire::REP_ACK => return self.all_granted(want, got),
                wire::REP_META_CONTEXT => {
                    let (id, name) = wire::meta_context(&payload).map_err(|w| self.protocol(w))?;
                    let Some(c) = want.iter().find(|c| c.name() == name) else {
                        return Err(self.protocol(format!("context {name:?} was not asked for")));
                    };
                    if got.iter().any(|(g, i)| g == c || *i == id) {
                        return Err(self.protocol(format!("context {name:?} granted twice")));
                    }
                    got.push((c.clone(), id));
                }
                k if k & wire::REP_ERR != 0 => {
                    return Err(self.refused("setting metadata contexts", k, &payload));
                }
                k => return Err(self.protocol(format!("unexpected reply {k} to meta contexts"))),
            }
        }
        Err(self.protocol("too many replies to meta contexts"))
    }

    fn all_granted(
        &self,
        want: &[Context],
        got: Vec<(Context, u32)>,
    ) -> Result<Vec<(Context, u32)>> {
        match want.iter().find(|w| !got.iter().any(|(g, _)| g == *w)) {
            None => Ok(got),
            Some(Context::DirtyBitmap(b)) => Err(Error::new(
                self.role,
                format!(
                    "{} has no dirty bitmap {b:?} (qemu-nbd exports one with --bitmap={b})",
                    self.who
                ),
            )),
            Some(c) => Err(Error::new(
                self.role,
                format!("{} does not report {}", self.who, c.name()),
            )),
        }
    }

    fn go(&mut self, export: &str) -> Result<(u64, u16, Option<BlockSizes>)> {
        let mut data = Vec::new();
        wire::put_string(&mut data, export);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
        self.send(&wire::option(wire::OPT_GO, &data))?;
        let (mut export_info, mut sizes) = (None, None);
        for _ in 0..MAX_REPLIES {
            let (kind, payload) = self.reply(wire::OPT_GO)?;
            match kind {
                wire::REP_INFO => match wire::info(&payload).map_err(|w| self.protocol(w))? {
                    Info::Export { size, flags } => export_info = Some((size, flags)),
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        sizes = Some(BlockSizes {
                            min,
                            preferred,
                            max,
                        })
                    }
                    Info::Other(_) => {}
                },
                wire::REP_ACK => {
                    let (size, flags) = export_info
                        .ok_or_else(|| self.protocol("NBD_OPT_GO ended without the export size"))?;
                    return Ok((size, flags, sizes));
                }
                wire::REP_ERR_UNKNOWN => {
                    return Err(self.refused("no such export", kind, &payload));
                }
                k if k & wire::REP_ERR != 0 => {
                    return Err(self.refused("opening the export", k, &payload));
                }
                k => return Err(self.protocol(format!("unexpected reply {k} to NBD_OPT_GO"))),
            }
        }
        Err(self.protocol("too many replies to NBD_OPT_GO"))
    }
}

/// Runs the handshake for `export` on `s`, asking for the contexts `want`. `who` names
/// the export in messages; `role` is the kind of the errors that are not protocol
/// violations (a missing export, a refused context).
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &str,
    want: &[Context],
    who: &str,
    role: Kind,
) -> Result<Negotiated> {
    let mut hs = Hs {
        s,
        who: who.to_string(),
        role,
    };
    hs.greet()?;
    let structured = hs.structured()?;
    let contexts = if want.is_empty() {
        Vec::new()
    } else if !structured {
        return Err(Error::new(
            role,
            format!("{who}: the server lacks structured replies, which block status needs"),
        ));
    } else {
        hs.meta_contexts(export, want)?
    };
    let (size, bits, sizes) = hs.go(export)?;
    if bits & wire::TFLAG_HAS_FLAGS == 0 {
        return Err(hs.protocol("transmission flags without NBD_FLAG_HAS_FLAGS"));
    }
    let sizes = sizes.unwrap_or_default();
    if !size.is_multiple_of(u64::from(sizes.min)) {
        return Err(hs.protocol(format!("size {size} is not a multiple of the block size")));
    }
    Ok(Negotiated {
        size,
        flags: Flags::from_bits(bits),
        sizes,
        structured,
        contexts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::nbd::fake::{Script, opt_reply};

    fn greeting() -> Vec<u8> {
        let mut b = wire::NBDMAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&3u16.to_be_bytes());
        b
    }

    /// The server's answer naming metadata context `name` as `id`.
    fn meta_context(id: u32, name: &str) -> Vec<u8> {
        let mut ctx = id.to_be_bytes().to_vec();
        ctx.extend_from_slice(name.as_bytes());
        opt_reply(wire::OPT_SET_META_CONTEXT, wire::REP_META_CONTEXT, &ctx)
    }

    fn export_info(size: u64, flags: u16) -> Vec<u8> {
        let mut p = wire::INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        p
    }

    fn run(server: Vec<u8>, want: &[Context]) -> Result<Negotiated> {
        let mut s = Script::new(server);
        negotiate(&mut s, "e", want, "NBD export 'e'", Kind::Source)
    }

    #[test]
    fn a_good_handshake_reads_size_flags_and_contexts() {
        let mut srv = greeting();
        srv.extend(opt_reply(wire::OPT_STRUCTURED_REPLY, wire::REP_ACK, &[]));
        srv.extend(meta_context(9, "base:allocation"));
        srv.extend(opt_reply(wire::OPT_SET_META_CONTEXT, wire::REP_ACK, &[]));
        let bits = wire::TFLAG_HAS_FLAGS | wire::TFLAG_READ_ONLY | wire::TFLAG_SEND_TRIM;
        srv.extend(opt_reply(
            wire::OPT_GO,
            wire::REP_INFO,
            &export_info(1 << 20, bits),
        ));
        srv.extend(opt_reply(wire::OPT_GO, wire::REP_ACK, &[]));
        let n = run(srv, &[Context::Allocation]).unwrap();
        assert_eq!(n.size, 1 << 20);
        assert!(n.flags.read_only && n.flags.can_trim && !n.flags.can_flush);
        assert_eq!(n.contexts, vec![(Context::Allocation, 9)]);
        assert_eq!(n.sizes, BlockSizes::default());
    }

    #[test]
    fn refusals_and_malformed_replies_are_clear_errors() {
        let start = || {
            let mut s = greeting();
            s.extend(opt_reply(wire::OPT_STRUCTURED_REPLY, wire::REP_ACK, &[]));
            s
        };
        let mut unknown = start();
        unknown.extend(opt_reply(
            wire::OPT_GO,
            wire::REP_ERR_UNKNOWN,
            b"no \x1b[2Jsuch",
        ));
        let e = run(unknown, &[]).unwrap_err();
        assert_eq!(e.kind, Kind::Source);
        assert!(e.message.contains("'e'") && e.message.contains("no such export"));
        assert!(
            e.message.contains("\\x1b"),
            "server text made harmless: {e}"
        );

        let mut no_bitmap = start();
        no_bitmap.extend(opt_reply(wire::OPT_SET_META_CONTEXT, wire::REP_ACK, &[]));
        let e = run(no_bitmap, &[Context::DirtyBitmap("b0".into())]).unwrap_err();
        assert!(e.message.contains("--bitmap=b0"), "{e}");

        let mut stranger = start();
        stranger.extend(meta_context(1, "qemu:other"));
        let e = run(stranger, &[Context::Allocation]).unwrap_err();
        assert_eq!(e.kind, Kind::Protocol);

        let mut no_size = start();
        no_size.extend(opt_reply(wire::OPT_GO, wire::REP_ACK, &[]));
        assert_eq!(run(no_size, &[]).unwrap_err().kind, Kind::Protocol);

        let mut huge = start();
        let mut h = wire::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&wire::OPT_GO.to_be_bytes());
        h.extend_from_slice(&wire::REP_INFO.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend(h);
        assert!(run(huge, &[]).unwrap_err().message.contains("at most"));

        let mut endless = start();
        for _ in 0..MAX_REPLIES {
            endless.extend(opt_reply(wire::OPT_GO, wire::REP_INFO, &[0, 42]));
        }
        assert!(run(endless, &[]).unwrap_err().message.contains("too many"));

        let mut cut = start();
        cut.extend(&opt_reply(wire::OPT_GO, wire::REP_INFO, &export_info(4096, 1))[..30]);
        assert_eq!(run(cut, &[]).unwrap_err().kind, Kind::Source);

        let e = run(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(), &[]).unwrap_err();
        assert!(e.message.contains("not an NBD server"), "{e}");
        let mut old = wire::NBDMAGIC.to_be_bytes().to_vec();
        old.extend_from_slice(&wire::OLDSTYLE.to_be_bytes());
        assert!(run(old, &[]).unwrap_err().message.contains("oldstyle"));
    }

    #[test]
    fn block_status_needs_structured_replies() {
        let mut srv = greeting();
        srv.extend(opt_reply(
            wire::OPT_STRUCTURED_REPLY,
            wire::REP_ERR | 1,
            &[],
        ));
        let e = run(srv, &[Context::Allocation]).unwrap_err();
        assert!(e.message.contains("structured replies"), "{e}");
    }
}
