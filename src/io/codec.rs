//! Little-endian binary fields, shared by the three formats blocksync writes: protocol
//! frames, digest files and patches. Reading is checked: a field past the end is an error,
//! never a panic, so each format only adds its own bounds on top.

/// Why bytes did not hold the fields asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Short {
    /// Fewer bytes than a field needs.
    Truncated,
    /// Bytes left after the last field.
    Trailing(usize),
}

/// Checked reads from a byte slice, front to back.
pub struct Rd<'a>(pub &'a [u8]);

impl<'a> Rd<'a> {
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        if self.0.len() < n {
            return Err(Short::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.take(1)?[0])
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> Result<u16, Short> {
        self.array().map(u16::from_le_bytes)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_le_bytes)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_le_bytes)
    }

    /// Bytes not read yet.
    pub fn left(&self) -> usize {
        self.0.len()
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    /// Succeeds only if every byte was read.
    pub fn end(self) -> Result<(), Short> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(Short::Trailing(n)),
        }
    }
}

/// Appends one byte.
pub fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

/// Appends a little-endian u16.
pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a little-endian u32.
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a little-endian u64.
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends `s` cut to at most `max` bytes on a char boundary, after its u32 length. The
/// texts written are ours (paths, messages, names): cut rather than fail.
pub fn put_text(out: &mut Vec<u8>, s: &str, max: usize) {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    put_u32(out, n as u32);
    out.extend_from_slice(&s.as_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_overruns_are_errors() {
        let mut out = Vec::new();
        put_u8(&mut out, 7);
        put_u16(&mut out, 0x1234);
        put_u32(&mut out, 0xdead_beef);
        put_u64(&mut out, u64::MAX - 1);
        put_text(&mut out, "déjà", 2); // 2 ends inside "é": cut to "d"
        let mut r = Rd(&out);
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.u16(), Ok(0x1234));
        assert_eq!(r.u32(), Ok(0xdead_beef));
        assert_eq!(r.u64(), Ok(u64::MAX - 1));
        assert_eq!(r.u32(), Ok(1));
        assert_eq!(r.take(1), Ok(&b"d"[..]));
        assert_eq!(r.u8(), Err(Short::Truncated));
        assert_eq!(Rd(&[1, 2]).end(), Err(Short::Trailing(2)));
        assert_eq!(Rd(&[1, 2, 3]).u32(), Err(Short::Truncated));
    }
}
