//! WireGuard message layouts (types 1 to 4) and their zero-copy classification.
//!
//! All integers on the wire are little-endian. Offsets follow the whitepaper §5.4.

pub(super) const TYPE_INITIATION: u8 = 1;
pub(super) const TYPE_RESPONSE: u8 = 2;
pub(super) const TYPE_COOKIE_REPLY: u8 = 3;
pub(super) const TYPE_TRANSPORT: u8 = 4;

pub(super) const INITIATION_LEN: usize = 148;
pub(super) const RESPONSE_LEN: usize = 92;
pub(super) const COOKIE_REPLY_LEN: usize = 64;
/// Transport header: type, receiver index and counter.
pub const TRANSPORT_HEADER_LEN: usize = 16;
pub(super) const AEAD_TAG_LEN: usize = 16;
/// The smallest transport message: header and the tag of an empty (keepalive) payload.
pub(super) const TRANSPORT_MIN_LEN: usize = TRANSPORT_HEADER_LEN + AEAD_TAG_LEN;
/// Bytes a caller must leave free after a plaintext so that it can be sealed in place:
/// padding to a multiple of 16 plus the tag.
pub const SEAL_TAILROOM: usize = 15 + AEAD_TAG_LEN;

/// Noise payloads inside handshake messages.
pub(super) const INITIATION_NOISE: std::ops::Range<usize> = 8..116;
pub(super) const RESPONSE_NOISE: std::ops::Range<usize> = 12..60;

/// What a received datagram claims to be, judged only by its type byte and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Initiation,
    Response,
    CookieReply,
    Transport,
}

/// Classifies a datagram; `None` for anything that is not a well-formed WireGuard message.
pub(super) fn classify(datagram: &[u8]) -> Option<Kind> {
    if datagram.len() < 4 || datagram[1..4] != [0, 0, 0] {
        return None;
    }
    match (datagram[0], datagram.len()) {
        (TYPE_INITIATION, INITIATION_LEN) => Some(Kind::Initiation),
        (TYPE_RESPONSE, RESPONSE_LEN) => Some(Kind::Response),
        (TYPE_COOKIE_REPLY, COOKIE_REPLY_LEN) => Some(Kind::CookieReply),
        (TYPE_TRANSPORT, n) if n >= TRANSPORT_MIN_LEN => Some(Kind::Transport),
        _ => None,
    }
}

/// Whether `datagram` claims to be transport data (by its type byte only).
pub fn is_transport(datagram: &[u8]) -> bool {
    datagram.first() == Some(&TYPE_TRANSPORT)
}

pub(super) fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

pub(super) fn read_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

pub(super) fn write_header(buf: &mut [u8], msg_type: u8) {
    buf[..4].copy_from_slice(&[msg_type, 0, 0, 0]);
}

/// Offsets of mac1 and mac2 in a handshake message of `len` bytes.
pub(super) fn mac_offsets(len: usize) -> (usize, usize) {
    (len - 32, len - 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_checks_type_length_and_reserved_bytes() {
        let mut init = [0u8; INITIATION_LEN];
        init[0] = TYPE_INITIATION;
        assert_eq!(classify(&init), Some(Kind::Initiation));
        assert_eq!(classify(&init[..INITIATION_LEN - 1]), None);
        init[2] = 1;
        assert_eq!(classify(&init), None);
        let mut data = [0u8; TRANSPORT_MIN_LEN];
        data[0] = TYPE_TRANSPORT;
        assert_eq!(classify(&data), Some(Kind::Transport));
        assert_eq!(classify(&data[..TRANSPORT_MIN_LEN - 1]), None);
        assert_eq!(classify(&[9, 0, 0, 0, 1, 2]), None);
        assert_eq!(classify(&[]), None);
    }
}
