//! RESP, the Redis serialisation protocol.
//!
//! Requests arrive as RESP2 arrays of bulk strings (what every client library sends) or as
//! inline commands (a line of words: what `telnet` users and redis-benchmark's `PING` send).
//! [`parse`] takes one request off the front of the read buffer without copying the array's
//! bulk strings; it answers [`Parsed::Incomplete`] when the request has not fully arrived, so a
//! caller parses every complete request in its buffer, answers them all and only then reads
//! again (pipelining). Replies are written by [`Out`] in RESP2, or in RESP3 once a client has
//! asked for it with `HELLO 3` (maps, a null of its own, verbatim strings).

use std::borrow::Cow;

/// One argument of a request: borrowed from the read buffer, or owned when an inline
/// command's quoting had to be undone.
pub type Arg<'a> = Cow<'a, [u8]>;

/// The longest line before its CRLF that announces an array or bulk length (Redis: 64 KiB).
const MAX_LENGTH_LINE: usize = 64 * 1024;

/// Most elements in one request array (Redis's limit too).
const MAX_ELEMENTS: i64 = i32::MAX as i64;

/// Limits on what one request may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest bulk string accepted (Redis's `proto-max-bulk-len`, default 512 MiB).
    pub max_bulk: u64,
    /// The longest inline command line (Redis: 64 KiB).
    pub max_inline: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_bulk: 512 * 1024 * 1024, max_inline: 64 * 1024 }
    }
}

/// A request that breaks the protocol: answered with `-ERR Protocol error: {0}`, after which
/// the connection is closed (the stream can no longer be framed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// What [`parse`] found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// No complete request yet; at least this many bytes are needed in all (0: unknown).
    Incomplete(usize),
    /// One request: its arguments (empty for a blank line or an empty array, which Redis
    /// skips without a reply) and the number of bytes it took.
    Request {
        /// The command name and its arguments.
        args: Vec<Arg<'a>>,
        /// Bytes consumed from the buffer.
        len: usize,
    },
}

/// The position of the CRLF that ends the line starting at `from`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(2).position(|w| w == b"\r\n").map(|at| from + at)
}

/// Redis's `string2ll`: an optional `-`, then decimal digits without a leading zero (except
/// "0" itself), within `i64`. No `+`, no spaces.
pub fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if digits[0] == b'0' && (digits.len() > 1 || negative) {
        return None;
    }
    // 19 digits fit in u64; the sign is applied with overflow checks.
    let magnitude = digits.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// Takes one request off the front of `buf`.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, ProtocolError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete(0)),
        Some(b'*') => parse_array(buf, limits),
        Some(_) => parse_inline(buf, limits),
    }
}

fn parse_array<'a>(buf: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, ProtocolError> {
    let Some(end) = find_crlf(buf, 1) else {
        if buf.len() > MAX_LENGTH_LINE {
            return Err(ProtocolError("too big mbulk count string".into()));
        }
        return Ok(Parsed::Incomplete(0));
    };
    let count = match parse_i64(&buf[1..end]) {
        Some(n) if n <= MAX_ELEMENTS => n,
        _ => return Err(ProtocolError("invalid multibulk length".into())),
    };
    let mut at = end + 2;
    if count <= 0 {
        return Ok(Parsed::Request { args: Vec::new(), len: at });
    }
    // No capacity from the announced count: it costs nothing to announce a billion.
    let mut args = Vec::with_capacity((count as usize).min(64));
    for _ in 0..count {
        match buf.get(at) {
            None => return Ok(Parsed::Incomplete(0)),
            Some(b'$') => {}
            Some(&other) => {
                return Err(ProtocolError(format!("expected '$', got '{}'", other.escape_ascii())))
            }
        }
        let Some(end) = find_crlf(buf, at + 1) else {
            if buf.len() - at > MAX_LENGTH_LINE {
                return Err(ProtocolError("too big bulk count string".into()));
            }
            return Ok(Parsed::Incomplete(0));
        };
        let len = match parse_i64(&buf[at + 1..end]) {
            Some(n) if n >= 0 && n as u64 <= limits.max_bulk => n as usize,
            _ => return Err(ProtocolError("invalid bulk length".into())),
        };
        let start = end + 2;
        let Some(after) = start.checked_add(len).and_then(|n| n.checked_add(2)) else {
            return Err(ProtocolError("invalid bulk length".into()));
        };
        if buf.len() < after {
            return Ok(Parsed::Incomplete(after));
        }
        if &buf[after - 2..after] != b"\r\n" {
            return Err(ProtocolError("expected CRLF after a bulk string".into()));
        }
        args.push(Cow::Borrowed(&buf[start..start + len]));
        at = after;
    }
    Ok(Parsed::Request { args, len: at })
}

fn parse_inline<'a>(buf: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, ProtocolError> {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.max_inline {
            return Err(ProtocolError("too big inline request".into()));
        }
        return Ok(Parsed::Incomplete(0));
    };
    if newline > limits.max_inline {
        return Err(ProtocolError("too big inline request".into()));
    }
    let line = &buf[..newline];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let args = split_inline(line)
        .ok_or_else(|| ProtocolError("unbalanced quotes in request".into()))?
        .into_iter()
        .map(Cow::Owned)
        .collect();
    Ok(Parsed::Request { args, len: newline + 1 })
}

/// Redis's `sdssplitargs`: words separated by blanks; `"..."` with `\n \r \t \b \a \\ \"` and
/// `\xHH` escapes; `'...'` with `\'` only. A closing quote must be followed by a blank or the
/// end. `None` on unbalanced quotes.
pub fn split_inline(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return Some(args);
        }
        let mut word = Vec::new();
        let (mut double, mut single) = (false, false);
        loop {
            let c = line.get(i).copied();
            if double {
                match c {
                    None => return None,
                    Some(b'\\') if line.get(i + 1) == Some(&b'x') => {
                        let hex = line.get(i + 2..i + 4).and_then(|h| std::str::from_utf8(h).ok());
                        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                            Some(byte) => {
                                word.push(byte);
                                i += 3;
                            }
                            None => word.push(b'\\'),
                        }
                    }
                    Some(b'\\') if i + 1 < line.len() => {
                        i += 1;
                        word.push(match line[i] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 8,
                            b'a' => 7,
                            other => other,
                        });
                    }
                    Some(b'"') => {
                        if line.get(i + 1).is_some_and(|b| !b.is_ascii_whitespace()) {
                            return None;
                        }
                        double = false;
                        i += 1;
                        break;
                    }
                    Some(other) => word.push(other),
                }
            } else if single {
                match c {
                    None => return None,
                    Some(b'\\') if line.get(i + 1) == Some(&b'\'') => {
                        word.push(b'\'');
                        i += 1;
                    }
                    Some(b'\'') => {
                        if line.get(i + 1).is_some_and(|b| !b.is_ascii_whitespace()) {
                            return None;
                        }
                        single = false;
                        i += 1;
                        break;
                    }
                    Some(other) => word.push(other),
                }
            } else {
                match c {
                    None => break,
                    Some(b) if b.is_ascii_whitespace() => break,
                    Some(b'"') => double = true,
                    Some(b'\'') => single = true,
                    Some(other) => word.push(other),
                }
            }
            i += 1;
        }
        debug_assert!(!double && !single);
        args.push(word);
    }
}

/// The reply buffer of one connection, written in the connection's protocol version.
#[derive(Debug, Default)]
pub struct Out {
    buf: Vec<u8>,
    resp3: bool,
}

impl Out {
    /// An empty buffer writing RESP2.
    pub fn new() -> Out {
        Out::default()
    }

    /// Whether replies are written in RESP3.
    pub fn resp3(&self) -> bool {
        self.resp3
    }

    /// Switches the protocol version (after `HELLO`).
    pub fn set_resp3(&mut self, resp3: bool) {
        self.resp3 = resp3;
    }

    /// The bytes written so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is waiting to be sent.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Forgets what was written (after it was sent).
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    fn line(&mut self, prefix: u8, text: &[u8]) {
        self.buf.push(prefix);
        // A CR or LF inside would end the line early and desynchronise the client.
        self.buf.extend(text.iter().map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
        self.buf.extend_from_slice(b"\r\n");
    }

    fn length(&mut self, prefix: u8, n: usize) {
        self.buf.push(prefix);
        self.buf.extend_from_slice(n.to_string().as_bytes());
        self.buf.extend_from_slice(b"\r\n");
    }

    /// A simple string: `+OK`.
    pub fn simple(&mut self, text: &str) {
        self.line(b'+', text.as_bytes());
    }

    /// `+OK`.
    pub fn ok(&mut self) {
        self.simple("OK");
    }

    /// An error; `text` starts with its code (`ERR ...`, `WRONGPASS ...`).
    pub fn error(&mut self, text: &str) {
        self.line(b'-', text.as_bytes());
    }

    /// An integer.
    pub fn int(&mut self, n: i64) {
        self.buf.push(b':');
        self.buf.extend_from_slice(n.to_string().as_bytes());
        self.buf.extend_from_slice(b"\r\n");
    }

    /// A bulk string.
    pub fn bulk(&mut self, bytes: &[u8]) {
        self.length(b'$', bytes.len());
        self.buf.extend_from_slice(bytes);
        self.buf.extend_from_slice(b"\r\n");
    }

    /// A bulk string, or the null reply when absent.
    pub fn bulk_or_null(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            Some(bytes) => self.bulk(bytes),
            None => self.null(),
        }
    }

    /// The null bulk string (RESP2 `$-1`, RESP3 `_`).
    pub fn null(&mut self) {
        self.buf.extend_from_slice(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" });
    }

    /// The null array (RESP2 `*-1`, RESP3 `_`).
    pub fn null_array(&mut self) {
        self.buf.extend_from_slice(if self.resp3 { b"_\r\n" } else { b"*-1\r\n" });
    }

    /// The header of an array of `n` elements, which follow.
    pub fn array(&mut self, n: usize) {
        self.length(b'*', n);
    }

    /// The header of a map of `n` pairs, whose keys and values follow in turn (RESP2: a flat
    /// array of `2n` elements).
    pub fn map(&mut self, n: usize) {
        if self.resp3 {
            self.length(b'%', n);
        } else {
            self.length(b'*', 2 * n);
        }
    }

    /// Text meant for humans, as INFO answers it: a verbatim string in RESP3, a bulk string
    /// in RESP2.
    pub fn verbatim(&mut self, text: &str) {
        if self.resp3 {
            self.length(b'=', text.len() + 4);
            self.buf.extend_from_slice(b"txt:");
            self.buf.extend_from_slice(text.as_bytes());
            self.buf.extend_from_slice(b"\r\n");
        } else {
            self.bulk(text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(buf: &[u8]) -> (Vec<Vec<u8>>, usize) {
        match parse(buf, &Limits::default()) {
            Ok(Parsed::Request { args, len }) => (args.into_iter().map(Cow::into_owned).collect(), len),
            other => panic!("{other:?}"),
        }
    }

    fn error(buf: &[u8]) -> String {
        match parse(buf, &Limits::default()) {
            Err(ProtocolError(e)) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn arrays_parse_and_report_their_length() {
        let frame = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n";
        assert_eq!(request(frame), (vec![b"GET".to_vec(), b"k".to_vec()], 20));
        assert_eq!(request(b"*0\r\n"), (vec![], 4));
        assert_eq!(request(b"*1\r\n$0\r\n\r\n"), (vec![vec![]], 10));
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        let frame = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nv\r\nlu\r\n";
        for cut in 0..frame.len() {
            assert!(
                matches!(parse(&frame[..cut], &Limits::default()), Ok(Parsed::Incomplete(_))),
                "prefix {cut}"
            );
        }
        assert_eq!(request(frame).0[2], b"v\r\nlu");
        // A bulk whose header arrived says how much it needs.
        assert_eq!(parse(b"*1\r\n$100\r\nab", &Limits::default()), Ok(Parsed::Incomplete(4 + 6 + 102)));
    }

    #[test]
    fn malformed_arrays_are_protocol_errors() {
        assert_eq!(error(b"*1\r\n!x\r\n"), "expected '$', got '!'");
        assert_eq!(error(b"*1\r\n\x00x\r\n"), "expected '$', got '\\x00'");
        assert_eq!(error(b"*x\r\n"), "invalid multibulk length");
        assert_eq!(error(b"*99999999999\r\n"), "invalid multibulk length");
        assert_eq!(error(b"*1\r\n$-5\r\n"), "invalid bulk length");
        assert_eq!(error(b"*1\r\n$999999999999\r\n"), "invalid bulk length");
        assert_eq!(error(b"*1\r\n$2\r\nabcd\r\n"), "expected CRLF after a bulk string");
        let long = [b"*".as_slice(), &[b'1'; MAX_LENGTH_LINE + 1]].concat();
        assert_eq!(error(&long), "too big mbulk count string");
        let small = Limits { max_bulk: 10, ..Limits::default() };
        assert_eq!(parse(b"*1\r\n$11\r\n", &small), Err(ProtocolError("invalid bulk length".into())));
    }

    #[test]
    fn inline_commands_split_like_redis() {
        assert_eq!(request(b"PING\r\n"), (vec![b"PING".to_vec()], 6));
        assert_eq!(request(b"  set  a   b\n"), (vec![b"set".to_vec(), b"a".to_vec(), b"b".to_vec()], 13));
        assert_eq!(request(b"\r\n").0, Vec::<Vec<u8>>::new());
        assert_eq!(
            request(b"set \"a b\\x41\\n\" 'it\\'s'\r\n").0,
            vec![b"set".to_vec(), b"a bA\n".to_vec(), b"it's".to_vec()]
        );
        assert_eq!(error(b"set \"open\r\n"), "unbalanced quotes in request");
        assert_eq!(error(b"set \"a\"b\r\n"), "unbalanced quotes in request");
        assert!(matches!(parse(b"PIN", &Limits::default()), Ok(Parsed::Incomplete(0))));
        assert_eq!(error(&vec![b'a'; 64 * 1024 + 1]), "too big inline request");
    }

    #[test]
    fn integers_parse_like_string2ll() {
        for (text, want) in [
            ("0", Some(0)),
            ("-1", Some(-1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("01", None),
            ("-0", None),
            ("+1", None),
            (" 1", None),
            ("", None),
            ("-", None),
            ("1.5", None),
        ] {
            assert_eq!(parse_i64(text.as_bytes()), want, "{text:?}");
        }
    }

    #[test]
    fn replies_follow_the_protocol_version() {
        let mut out = Out::new();
        out.null();
        out.map(1);
        out.verbatim("a");
        out.error("ERR bad\r\nthing");
        assert_eq!(out.bytes(), b"$-1\r\n*2\r\n$1\r\na\r\n-ERR bad  thing\r\n");
        let mut out = Out::new();
        out.set_resp3(true);
        out.null();
        out.map(1);
        out.verbatim("a");
        assert_eq!(out.bytes(), b"_\r\n%1\r\n=5\r\ntxt:a\r\n");
    }
}
