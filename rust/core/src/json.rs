//! A JSON parser for the usual record, producing the same `Value` that serde_json's
//! `Deserialize` impl gives, in about half the time on JSONL rows.
//!
//! Contract: `parse_fast(b) == Some(v)` implies `serde_json::from_slice::<Value>(b) == Ok(v)`,
//! with floats equal bit for bit and strings borrowed exactly where serde borrows them (no
//! escape in the string). Whatever serde rejects gives `None`; so may valid input that is
//! awkward here (nesting deeper than `MAX_DEPTH`, exponents of five or more digits). The
//! caller then falls back to serde_json, which also words every error message.
//! `tests/json_fast.rs` checks the contract against serde on random and damaged documents.

use std::borrow::Cow;

use crate::value::Value;

/// serde_json stops at 128 levels; bail well before so that we never accept what it rejects.
const MAX_DEPTH: u32 = 100;

/// Starting capacities. Exact sizes are unknown until the closing bracket; these fit the
/// common preference rows (4-5 fields per object, up to 8 responses) without regrowing, and
/// measured a little faster than 4 or 8 per object and than 4 or 12 per list.
const LIST_CAPACITY: usize = 8;
const OBJECT_CAPACITY: usize = 6;

/// Parse one complete JSON document (whitespace around it allowed).
pub fn parse_fast(bytes: &[u8]) -> Option<Value<'_>> {
    // serde rejects invalid UTF-8 anywhere (in a string as an error, outside one as a syntax
    // error), so checking the whole input once lets strings be sliced from `text` later
    // without checking them again.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut p = Parser { text, bytes, pos: 0 };
    let mut value = Value::Null;
    p.skip_ws();
    p.value_at(0, &mut value)?;
    p.skip_ws();
    (p.pos == bytes.len()).then_some(value)
}

// Every value is written straight into its place: a placeholder already pushed onto its
// list or object. Returning values instead made LLVM pass each one through a stack
// temporary written field by field and copied on 16 bytes at a time, which defeats store
// forwarding; those stalls were about a fifth of the parse time.

/// What a place holds until its value is parsed: a constant with no padding bytes, so that
/// pushing it is a few plain stores (`Null` made LLVM copy stale stack bytes along with it).
const PLACEHOLDER: Value<'static> = Value::Str(Cow::Borrowed(""));
const FIELD_PLACEHOLDER: (Cow<'static, str>, Value<'static>) = (Cow::Borrowed(""), PLACEHOLDER);

/// Overwrite a placeholder (or `Null`), which owns nothing: skipping its drop saves a call
/// per value.
#[inline(always)]
fn fill<T>(slot: &mut T, value: T) {
    std::mem::forget(std::mem::replace(slot, value));
}

/// A place for a string: an object key, or a value.
trait StrSlot<'a> {
    fn fill_str(&mut self, s: Cow<'a, str>);
}

impl<'a> StrSlot<'a> for Cow<'a, str> {
    #[inline(always)]
    fn fill_str(&mut self, s: Cow<'a, str>) {
        fill(self, s);
    }
}

impl<'a> StrSlot<'a> for Value<'a> {
    #[inline(always)]
    fn fill_str(&mut self, s: Cow<'a, str>) {
        fill(self, Value::Str(s));
    }
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    /// The byte at the cursor, or 0 at the end (a NUL is invalid outside strings anyway).
    #[inline]
    fn peek(&self) -> u8 {
        self.bytes.get(self.pos).copied().unwrap_or(0)
    }

    /// Skip JSON whitespace and return the byte after it (0 at the end).
    #[inline]
    fn skip_ws(&mut self) -> u8 {
        loop {
            match self.peek() {
                b' ' | b'\n' | b'\t' | b'\r' => self.pos += 1,
                b => return b,
            }
        }
    }

    /// The value at the cursor (whitespace already skipped), written into `slot`.
    #[inline(always)]
    fn value_at(&mut self, depth: u32, slot: &mut Value<'a>) -> Option<()> {
        match self.peek() {
            b'"' => {
                self.pos += 1;
                return self.string_at(slot);
            }
            b'-' | b'0'..=b'9' => {
                let number = match self.number()? {
                    Number::Int(i) => Value::Int(i),
                    Number::UInt(u) => Value::UInt(u),
                    Number::Float(x) => Value::Float(x),
                };
                fill(slot, number);
            }
            b'{' => return self.object(depth + 1, slot),
            b'[' => return self.list(depth + 1, slot),
            b't' => fill(slot, self.literal(b"true", Value::Bool(true))?),
            b'f' => fill(slot, self.literal(b"false", Value::Bool(false))?),
            b'n' => fill(slot, self.literal(b"null", Value::Null)?),
            _ => return None,
        }
        Some(())
    }

    #[inline(always)]
    fn literal(&mut self, word: &[u8], value: Value<'a>) -> Option<Value<'a>> {
        if self.bytes[self.pos..].starts_with(word) {
            self.pos += word.len();
            Some(value)
        } else {
            None
        }
    }

    /// Step into a list or object at the cursor: `Some(true)` if it is empty (and then
    /// already closed), `None` if it nests too deep.
    #[inline(always)]
    fn open(&mut self, depth: u32, close: u8) -> Option<bool> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        let empty = self.skip_ws() == close;
        self.pos += empty as usize;
        Some(empty)
    }

    /// After an element: `Some(true)` at the closing bracket (consumed), `Some(false)` after a
    /// comma and the whitespace after it, `None` on anything else.
    #[inline(always)]
    fn next_element(&mut self, close: u8) -> Option<bool> {
        let b = self.skip_ws();
        self.pos += 1;
        if b == close {
            Some(true)
        } else if b == b',' {
            self.skip_ws();
            Some(false)
        } else {
            None
        }
    }

    #[inline(never)]
    fn list(&mut self, depth: u32, slot: &mut Value<'a>) -> Option<()> {
        if self.open(depth, b']')? {
            fill(slot, Value::List(Vec::new()));
            return Some(());
        }
        let mut items = Vec::with_capacity(LIST_CAPACITY);
        loop {
            items.push(PLACEHOLDER);
            self.value_at(depth, items.last_mut().expect("just pushed"))?;
            if self.next_element(b']')? {
                fill(slot, Value::List(items));
                return Some(());
            }
        }
    }

    #[inline(never)]
    fn object(&mut self, depth: u32, slot: &mut Value<'a>) -> Option<()> {
        if self.open(depth, b'}')? {
            fill(slot, Value::Object(Vec::new()));
            return Some(());
        }
        let mut fields = Vec::with_capacity(OBJECT_CAPACITY);
        loop {
            if self.peek() != b'"' {
                return None;
            }
            self.pos += 1;
            fields.push(FIELD_PLACEHOLDER);
            let (key, value) = fields.last_mut().expect("just pushed");
            self.string_at(key)?;
            if self.skip_ws() != b':' {
                return None;
            }
            self.pos += 1;
            self.skip_ws();
            self.value_at(depth, value)?;
            if self.next_element(b'}')? {
                fill(slot, Value::Object(fields));
                return Some(());
            }
        }
    }

    /// A string whose opening quote has been consumed. Borrowed when it has no escape, as
    /// serde borrows it (`visit_borrowed_str`); otherwise owned.
    #[inline(always)]
    fn string_at(&mut self, slot: &mut impl StrSlot<'a>) -> Option<()> {
        let start = self.pos;
        let end = find_special(self.bytes, start);
        match self.bytes.get(end) {
            Some(b'"') => {
                self.pos = end + 1;
                // `start` follows a quote and `end` is one: both are char boundaries.
                slot.fill_str(Cow::Borrowed(&self.text[start..end]));
            }
            Some(b'\\') => slot.fill_str(Cow::Owned(self.escaped(start, end)?)),
            _ => return None, // a raw control character (serde rejects it), or the end
        }
        Some(())
    }

    /// The string from `start`, whose first backslash is at `i`, unescaped.
    #[inline(never)]
    fn escaped(&mut self, start: usize, mut i: usize) -> Option<String> {
        let bytes = self.bytes;
        // Room for the text up to the next quote: that is the whole string unless it has an
        // escaped quote, and unescaping only shortens text, so nearly always one allocation.
        let guess = memchr::memchr(b'"', &bytes[i..]).map_or(bytes.len() - start, |q| i + q - start);
        let mut out = String::with_capacity(guess);
        let mut run = start;
        loop {
            // `i` is at a quote, backslash or control byte, all ASCII, so a char boundary.
            out.push_str(&self.text[run..i]);
            match bytes.get(i) {
                Some(b'"') => {
                    self.pos = i + 1;
                    return Some(out);
                }
                Some(b'\\') => {
                    let (c, len) = match *bytes.get(i + 1)? {
                        b'"' => ('"', 2),
                        b'\\' => ('\\', 2),
                        b'/' => ('/', 2),
                        b'b' => ('\u{8}', 2),
                        b'f' => ('\u{c}', 2),
                        b'n' => ('\n', 2),
                        b'r' => ('\r', 2),
                        b't' => ('\t', 2),
                        b'u' => unicode_escape(&bytes[i..])?,
                        _ => return None,
                    };
                    out.push(c);
                    i += len;
                    run = i;
                    i = find_special(bytes, i);
                }
                _ => return None,
            }
        }
    }

    /// A number, checked against the JSON grammar: no leading zeros, `+`, bare `.` or empty
    /// exponent (a digit after a lone `0` is left for the caller to reject).
    fn number(&mut self) -> Option<Number> {
        let bytes = self.bytes;
        let start = self.pos;
        let negative = bytes[start] == b'-';
        let int_start = start + negative as usize;
        // All digits, integer and fraction parts together, as one integer: exact up to 19
        // digits (it wraps beyond, which the digit counts below guard against).
        let mut mantissa = 0u64;
        let mut i = match bytes.get(int_start) {
            Some(b'0') => int_start + 1,
            Some(b'1'..=b'9') => digits(bytes, int_start, &mut mantissa),
            _ => return None,
        };
        let int_digits = i - int_start;
        let mut frac_digits = 0;
        if bytes.get(i) == Some(&b'.') {
            let end = digits(bytes, i + 1, &mut mantissa);
            frac_digits = end - (i + 1);
            if frac_digits == 0 {
                return None;
            }
            i = end;
        }
        let mut exponent = 0i32;
        let has_exponent = matches!(bytes.get(i), Some(b'e' | b'E'));
        if has_exponent {
            i += 1;
            let exp_negative = bytes.get(i) == Some(&b'-');
            if matches!(bytes.get(i), Some(b'-' | b'+')) {
                i += 1;
            }
            let exp_start = i;
            while let Some(&d @ b'0'..=b'9') = bytes.get(i) {
                // Huge exponents are where serde's overflow rules get subtle; leave them to it.
                if i - exp_start == 4 {
                    return None;
                }
                exponent = exponent * 10 + (d - b'0') as i32;
                i += 1;
            }
            if i == exp_start {
                return None;
            }
            if exp_negative {
                exponent = -exponent;
            }
        }
        self.pos = i;

        if frac_digits == 0 && !has_exponent {
            return integer(negative, mantissa, &self.text[int_start..i]);
        }
        // Clinger's fast path: an exact mantissa up to 2^53 times or over an exact power of
        // ten is one correctly rounded operation, so it equals the correctly rounded result
        // that serde (float_roundtrip) and std both give.
        if int_digits + frac_digits <= 19 && mantissa <= 1 << 53 {
            let scale = exponent - frac_digits as i32;
            if (-22..=22).contains(&scale) {
                let m = mantissa as f64;
                let x = if scale < 0 { m / POW10[-scale as usize] } else { m * POW10[scale as usize] };
                return Some(Number::Float(if negative { -x } else { x }));
            }
        }
        // std's parser is correctly rounded for any number of digits, as is serde's.
        let x: f64 = self.text[start..i].parse().ok()?;
        // serde reports an overflow to infinity as an error ("number out of range").
        x.is_finite().then_some(Number::Float(x))
    }
}

/// Accumulate the decimal digits from `i` into `mantissa` (wrapping); returns where they end.
#[inline(always)]
fn digits(bytes: &[u8], mut i: usize, mantissa: &mut u64) -> usize {
    while let Some(&d @ b'0'..=b'9') = bytes.get(i) {
        *mantissa = mantissa.wrapping_mul(10).wrapping_add((d - b'0') as u64);
        i += 1;
    }
    i
}

/// A number as serde_json types it; small enough to come back in registers.
enum Number {
    Int(i64),
    UInt(u64),
    Float(f64),
}

/// An integer without fraction or exponent, typed as serde_json types it: i64 where it fits,
/// else u64 for positives, else f64; and `-0` is a float (-0.0) in serde.
fn integer(negative: bool, wrapped: u64, digits: &str) -> Option<Number> {
    let magnitude = if digits.len() <= 19 {
        wrapped // below 10^19 < 2^64: no wrap happened
    } else {
        match digits.bytes().try_fold(0u64, |m, d| m.checked_mul(10)?.checked_add((d - b'0') as u64)) {
            Some(m) => m,
            None => {
                // Beyond u64: serde gives the correctly rounded f64, or an error if infinite.
                let x: f64 = digits.parse().ok()?;
                return x.is_finite().then_some(Number::Float(if negative { -x } else { x }));
            }
        }
    };
    Some(if !negative {
        match i64::try_from(magnitude) {
            Ok(i) => Number::Int(i),
            Err(_) => Number::UInt(magnitude),
        }
    } else if magnitude == 0 || magnitude > 1 << 63 {
        Number::Float(-(magnitude as f64))
    } else {
        Number::Int((magnitude as i64).wrapping_neg()) // 2^63 wraps to i64::MIN, as wanted
    })
}

const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19,
    1e20, 1e21, 1e22,
];

/// `\uXXXX` (a surrogate pair as one char) at the start of `s`; returns the char and the
/// bytes it took. serde rejects lone surrogates in strings, and so do we.
fn unicode_escape(s: &[u8]) -> Option<(char, usize)> {
    let hi = hex4(s.get(2..6)?)?;
    match hi {
        0xD800..=0xDBFF => {
            if s.get(6..8)? != b"\\u" {
                return None;
            }
            let lo = hex4(s.get(8..12)?)?;
            if !(0xDC00..=0xDFFF).contains(&lo) {
                return None;
            }
            let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
            Some((char::from_u32(c)?, 12))
        }
        0xDC00..=0xDFFF => None,
        _ => Some((char::from_u32(hi)?, 6)),
    }
}

fn hex4(s: &[u8]) -> Option<u32> {
    s.iter().try_fold(0u32, |n, &b| Some(n * 16 + (b as char).to_digit(16)?))
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// For 8 bytes read little-endian: a mask whose lowest set bit is the high bit of the first
/// byte that is `"`, `\` or below 0x20 (zero if none; bits above the first hit may be
/// spurious, as a borrow only moves upward). A byte below `k` is one where `w - k*ONES` sets
/// bit 7 while `w` has it clear; a byte equal to `c` is a byte of `w ^ c*ONES` below 1.
#[inline]
fn special_bytes(w: u64) -> u64 {
    let quote = w ^ (ONES * b'"' as u64);
    let backslash = w ^ (ONES * b'\\' as u64);
    // `!w` has the same high bits as `!quote` and `!backslash` (neither constant has bit 7).
    (quote.wrapping_sub(ONES) | backslash.wrapping_sub(ONES) | w.wrapping_sub(ONES * 0x20)) & !w & HIGHS
}

fn word(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Index of the first `"`, `\` or control byte (< 0x20) at or after `i`, or `bytes.len()`.
/// Two words per step: most strings end within the first 16 bytes, and long ones go at
/// half the loop overhead.
#[inline]
pub(crate) fn find_special(bytes: &[u8], mut i: usize) -> usize {
    while let Some(chunk) = bytes.get(i..i + 16) {
        let (lo, hi) = (special_bytes(word(&chunk[..8])), special_bytes(word(&chunk[8..])));
        if lo | hi != 0 {
            let bit = if lo != 0 { lo.trailing_zeros() } else { 64 + hi.trailing_zeros() };
            return i + (bit / 8) as usize;
        }
        i += 16;
    }
    while let Some(&b) = bytes.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}
