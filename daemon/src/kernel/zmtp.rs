//! Finds Jupyter `execute_request`s in the bytes a front end sends on its
//! shell channel, without changing a byte: a ZMTP 3 reader (the greeting,
//! then frames: a flags byte, a 1- or 8-byte size, the body) that follows
//! each message to its header frame (the one after `<IDS|MSG>` and the
//! signature) and reads its `msg_type`.
//!
//! [`Scanner::scan`] stops right after the header frame of an
//! `execute_request`: the kernel cannot act on a message before its last
//! frame, so holding the rest back until the sync barrier is done is
//! enough. Anything it does not understand (another ZMTP version, a header
//! that is not JSON, one too large to look at) gets the barrier too: it
//! costs a little time, never a stale cell.

/// `<IDS|MSG>`: the delimiter between routing ids and a Jupyter message.
const DELIMITER: &[u8] = b"<IDS|MSG>";

/// The ZMTP 3 greeting's length.
const GREETING: usize = 64;

/// Headers larger than this are not read (a barrier is cheaper).
const MAX_HEADER: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Frames before the delimiter (routing ids), or the delimiter itself.
    Ids,
    /// The next frame is the signature.
    Signature,
    /// The next frame is the header.
    Header,
    /// The rest of the message.
    Rest,
}

#[derive(Debug)]
pub struct Scanner {
    /// Greeting bytes still to come.
    greeting_left: usize,
    /// The greeting's first 11 bytes (signature and major version).
    greeting: Vec<u8>,
    /// Not ZMTP 3 (or lost track): every read waits for the barrier.
    opaque: bool,
    /// Opaque mode: the next read is the one after a barrier.
    just_released: bool,
    /// Bytes of the current frame's flags and size.
    head: Vec<u8>,
    /// Body bytes of the current frame still to come.
    body_left: u64,
    /// The current frame's flags.
    flags: u8,
    /// The current frame's body, kept when it may be the delimiter or is
    /// the header.
    keep: Option<Vec<u8>>,
    stage: Stage,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            greeting_left: GREETING,
            greeting: Vec::with_capacity(11),
            opaque: false,
            just_released: false,
            head: Vec::with_capacity(9),
            body_left: 0,
            flags: 0,
            keep: None,
            stage: Stage::Ids,
        }
    }
}

const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

impl Scanner {
    /// Reads `data` (the next bytes of the stream). `Some(k)`: an
    /// `execute_request`'s header ends at `data[k]`; the bytes from `k` on
    /// must wait for the barrier, and are offered again after it.
    pub fn scan(&mut self, data: &[u8]) -> Option<usize> {
        if self.opaque {
            return self.opaque_scan(data);
        }
        let mut i = 0;
        while i < data.len() {
            if self.greeting_left > 0 {
                if self.greeting.len() < 11 {
                    // The signature and major version decide.
                    let want = (11 - self.greeting.len()).min(data.len() - i);
                    self.greeting.extend_from_slice(&data[i..i + want]);
                    self.greeting_left -= want;
                    i += want;
                    if self.greeting.len() == 11 && !self.is_zmtp3() {
                        return self.give_up(&data[i..], i);
                    }
                    continue;
                }
                let n = self.greeting_left.min(data.len() - i);
                self.greeting_left -= n;
                i += n;
                continue;
            }
            if self.body_left == 0 && self.keep.is_none() {
                // Flags and size.
                self.head.push(data[i]);
                i += 1;
                let flags = self.head[0];
                let need = if flags & LONG != 0 { 9 } else { 2 };
                if self.head.len() < need {
                    continue;
                }
                let size = if flags & LONG != 0 {
                    u64::from_be_bytes(self.head[1..9].try_into().expect("8 bytes"))
                } else {
                    u64::from(self.head[1])
                };
                self.head.clear();
                self.flags = flags;
                self.body_left = size;
                let is_command = flags & COMMAND != 0;
                if !is_command {
                    match self.stage {
                        Stage::Ids if size == DELIMITER.len() as u64 => {
                            self.keep = Some(Vec::with_capacity(DELIMITER.len()))
                        }
                        Stage::Header if size <= MAX_HEADER as u64 => {
                            self.keep = Some(Vec::with_capacity(size as usize))
                        }
                        _ => {}
                    }
                }
                if size == 0 && self.end_frame() {
                    return Some(i);
                }
                continue;
            }
            let n = (self.body_left.min((data.len() - i) as u64)) as usize;
            if let Some(k) = self.keep.as_mut() {
                k.extend_from_slice(&data[i..i + n]);
            }
            self.body_left -= n as u64;
            i += n;
            if self.body_left == 0 && self.end_frame() {
                return Some(i);
            }
        }
        None
    }

    fn is_zmtp3(&self) -> bool {
        let g = &self.greeting;
        g[0] == 0xFF && g[9] == 0x7F && g[10] >= 3
    }

    /// Switches to opaque mode: everything after `consumed` waits.
    fn give_up(&mut self, rest: &[u8], consumed: usize) -> Option<usize> {
        tracing::debug!("shell channel is not ZMTP 3: every read waits for the sync barrier");
        self.opaque = true;
        // The rest of this read waits; with none, the next read does.
        self.just_released = !rest.is_empty();
        self.just_released.then_some(consumed)
    }

    fn opaque_scan(&mut self, data: &[u8]) -> Option<usize> {
        if data.is_empty() {
            return None;
        }
        if self.just_released {
            self.just_released = false;
            None
        } else {
            self.just_released = true;
            Some(0)
        }
    }

    /// A frame's body is complete: true when the barrier is due now.
    fn end_frame(&mut self) -> bool {
        let kept = self.keep.take();
        let more = self.flags & MORE != 0;
        if self.flags & COMMAND != 0 {
            return false;
        }
        let mut due = false;
        self.stage = match self.stage {
            Stage::Ids if kept.as_deref() == Some(DELIMITER) => Stage::Signature,
            Stage::Ids => Stage::Ids,
            Stage::Signature => Stage::Header,
            Stage::Header => {
                due = match kept {
                    Some(h) => needs_barrier(&h),
                    None => true,
                };
                Stage::Rest
            }
            Stage::Rest => Stage::Rest,
        };
        if !more {
            // A message that ended before its header: nothing to look at.
            self.stage = Stage::Ids;
        }
        due
    }
}

/// The header of a message that must see every save: an `execute_request`
/// (or a header that cannot be read).
fn needs_barrier(header: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Header {
        msg_type: String,
    }
    match serde_json::from_slice::<Header>(header) {
        Ok(h) => h.msg_type == "execute_request",
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting() -> Vec<u8> {
        let mut g = vec![0u8; GREETING];
        g[0] = 0xFF;
        g[9] = 0x7F;
        g[10] = 3;
        g[11] = 1;
        g[12..16].copy_from_slice(b"NULL");
        g
    }

    fn frame(body: &[u8], more: bool) -> Vec<u8> {
        let mut f = Vec::new();
        let m = if more { MORE } else { 0 };
        if body.len() > 255 {
            f.push(m | LONG);
            f.extend_from_slice(&(body.len() as u64).to_be_bytes());
        } else {
            f.push(m);
            f.push(body.len() as u8);
        }
        f.extend_from_slice(body);
        f
    }

    fn message(msg_type: &str, content: &[u8]) -> (Vec<u8>, usize) {
        let header = format!(r#"{{"msg_id": "1", "msg_type": "{msg_type}", "session": "s"}}"#);
        let mut m = frame(b"<IDS|MSG>", true);
        m.extend(frame(b"deadbeef", true));
        m.extend(frame(header.as_bytes(), true));
        let header_end = m.len();
        m.extend(frame(b"{}", true));
        m.extend(frame(b"{}", true));
        m.extend(frame(content, false));
        (m, header_end)
    }

    fn stream() -> (Vec<u8>, usize) {
        // Greeting, a READY command, a kernel_info_request, an execute_request.
        let mut s = greeting();
        let ready = b"\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER";
        s.push(COMMAND);
        s.push(ready.len() as u8);
        s.extend_from_slice(ready);
        s.extend(message("kernel_info_request", b"{}").0);
        let at = s.len();
        let (m, end) = message("execute_request", &vec![b'x'; 300]);
        s.extend(m);
        (s, at + end)
    }

    #[test]
    fn stops_after_the_header_of_an_execute_request_only() {
        let (s, cut) = stream();
        let mut sc = Scanner::default();
        assert_eq!(sc.scan(&s), Some(cut));
        assert_eq!(sc.scan(&s[cut..]), None, "the rest goes");
        let (m, end) = message("execute_request", b"{}");
        assert_eq!(sc.scan(&m), Some(end), "the next one is found too");
    }

    #[test]
    fn byte_by_byte_finds_the_same_place() {
        let (s, cut) = stream();
        let mut sc = Scanner::default();
        for (i, b) in s.iter().enumerate() {
            let r = sc.scan(std::slice::from_ref(b));
            if i + 1 == cut {
                assert_eq!(r, Some(1), "at byte {i}");
            } else {
                assert_eq!(r, None, "at byte {i}");
            }
        }
    }

    #[test]
    fn routing_ids_before_the_delimiter_are_skipped() {
        let mut s = greeting();
        s.extend(frame(b"some-identity", true));
        let (m, end) = message("execute_request", b"{}");
        let at = s.len();
        s.extend(m);
        assert_eq!(Scanner::default().scan(&s), Some(at + end));
    }

    #[test]
    fn other_protocols_wait_on_every_read() {
        let mut sc = Scanner::default();
        let mut s = vec![0u8; 20];
        s[0] = 0x01;
        assert_eq!(sc.scan(&s), Some(11));
        assert_eq!(sc.scan(&s[11..]), None, "released");
        assert_eq!(sc.scan(b"more"), Some(0));
        assert_eq!(sc.scan(b"more"), None);
    }

    #[test]
    fn an_unreadable_header_gets_the_barrier() {
        assert!(needs_barrier(b"not json"));
        assert!(!needs_barrier(br#"{"msg_type":"complete_request"}"#));
        assert!(needs_barrier(br#"{"msg_type":"execute_request"}"#));
    }
}
