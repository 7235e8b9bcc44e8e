//! The `--bad-blocks` map: which source ranges could not be read, in GNU ddrescue's
//! mapfile format, so ddrescue (and viewers such as ddrescueview) can read it, e.g. to
//! retry only the bad areas later.

use std::io::{self, Write};
use std::ops::Range;
use std::path::Path;

/// The mapfile text for a source of `size` bytes with `bad` ranges (ascending, merged).
/// Bytes before `reached` and not bad are finished (`+`); bytes after it were not tried
/// (`?`); `None`: unknown how far the run got, so only the bad ranges are certain.
pub fn render(size: u64, bad: &[Range<u64>], reached: Option<u64>) -> String {
    let reached = reached.unwrap_or(0).min(size);
    let mut areas: Vec<(u64, u64, char)> = Vec::new();
    let mut push = |start: u64, end: u64, status: char| {
        if start >= end {
            return;
        }
        match areas.last_mut() {
            Some(last) if last.2 == status && last.0 + last.1 == start => last.1 += end - start,
            _ => areas.push((start, end - start, status)),
        }
    };
    let mut pos = 0;
    for r in bad {
        let (s, e) = (r.start.min(size), r.end.min(size));
        push(pos, s.min(reached).max(pos), '+');
        push(pos.max(reached), s, '?');
        push(s, e, '-');
        pos = pos.max(e);
    }
    push(pos, reached.max(pos), '+');
    push(pos.max(reached), size, '?');
    let mut out = String::new();
    out.push_str(&format!(
        "# Mapfile. Created by blocksync {} (GNU ddrescue format)\n",
        env!("CARGO_PKG_VERSION")
    ));
    out.push_str("# '-': unreadable source bytes, '+': copied, '?': not reached\n");
    out.push_str("# current_pos  current_status  current_pass\n");
    out.push_str(&format!("0x{reached:08X}     +               1\n"));
    out.push_str("#      pos        size  status\n");
    for (pos, len, status) in areas {
        out.push_str(&format!("0x{pos:08X}  0x{len:08X}  {status}\n"));
    }
    out
}

/// Writes `text` to `path` atomically: a reader sees the old map or the new one, whole.
pub fn write(path: &Path, text: &str) -> io::Result<()> {
    crate::io::target::write_atomically(path, |f| f.write_all(text.as_bytes()), |_, e| e)
}

/// The unreadable (`-`) ranges listed in a mapfile's text.
pub fn parse_bad(text: &str) -> Result<Vec<Range<u64>>, String> {
    let mut out = Vec::new();
    let mut header_seen = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !header_seen {
            header_seen = true; // the current_pos line
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| {
            u64::from_str_radix(s.trim_start_matches("0x").trim_start_matches("0X"), 16)
                .map_err(|_| format!("bad number {s:?} in map line {line:?}"))
        };
        if f.len() != 3 {
            return Err(format!("bad map line {line:?}"));
        }
        let (pos, len) = (num(f[0])?, num(f[1])?);
        if f[2] == "-" {
            out.push(pos..pos + len);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_covers_everything_and_round_trips() {
        let bad = vec![512..1024, 4096..8192];
        let text = render(10_000, &bad, Some(10_000));
        assert!(text.contains("0x00000000  0x00000200  +"), "{text}");
        assert!(text.contains("0x00000200  0x00000200  -"), "{text}");
        assert!(text.contains("0x00002000  0x00000710  +"), "{text}");
        assert_eq!(parse_bad(&text).unwrap(), bad);
        let partial = render(10_000, &bad, Some(6000));
        assert!(partial.contains("0x00002000  0x00000710  ?"), "{partial}");
        let none = render(100, &[], Some(100));
        assert!(none.contains("0x00000000  0x00000064  +"), "{none}");
    }
}
