//! The hand-written JSON parser against serde_json, its reference: whenever `parse_fast`
//! returns a value it must be exactly serde's (floats bit for bit, borrowed strings where
//! serde borrows), and whenever serde fails it must return None. Documents are random value
//! trees written out with random whitespace and escapes, then also randomly damaged.
//!
//! `JSON_FUZZ_CASES=20000 cargo test --release -p prefops-core --test json_fast` runs more.

use std::borrow::Cow;

use proptest::prelude::*;

use prefops_core::json::parse_fast;
use prefops_core::Value;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("JSON_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Equal as the contract means it: same variants all the way down, floats by bit pattern,
/// strings and keys both borrowed or both owned.
fn same(a: &Value, b: &Value) -> bool {
    #[allow(clippy::ptr_arg)] // the variant is what is compared
    fn cow(a: &Cow<str>, b: &Cow<str>) -> bool {
        matches!((a, b), (Cow::Borrowed(_), Cow::Borrowed(_)) | (Cow::Owned(_), Cow::Owned(_))) && a == b
    }
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Str(x), Value::Str(y)) => cow(x, y),
        (Value::List(x), Value::List(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((ka, va), (kb, vb))| cow(ka, kb) && same(va, vb))
        }
        (Value::List(_) | Value::Object(_) | Value::Str(_) | Value::Float(_), _) => false,
        _ => a == b,
    }
}

/// Check the contract for one input. With `must_parse`, a document serde accepts must also
/// be accepted (so a parser that always declines cannot pass).
fn check(bytes: &[u8], must_parse: bool) -> Result<(), TestCaseError> {
    let fast = parse_fast(bytes);
    let slow = serde_json::from_slice::<Value>(bytes);
    let shown = String::from_utf8_lossy(bytes);
    match (fast, slow) {
        (Some(f), Ok(s)) => prop_assert!(same(&f, &s), "{shown}\nfast {f:?}\nserde {s:?}"),
        (Some(f), Err(e)) => prop_assert!(false, "{shown}\nfast {f:?}\nbut serde fails: {e}"),
        (None, Ok(s)) => prop_assert!(!must_parse, "{shown}\nfast declined; serde {s:?}"),
        (None, Err(_)) => {}
    }
    Ok(())
}

/// A document before it is written out: numbers are kept as text so that any grammatical
/// spelling can be tried.
#[derive(Debug, Clone)]
enum Doc {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    List(Vec<Doc>),
    Object(Vec<(String, Doc)>),
}

const EDGE_NUMBERS: &[&str] = &[
    "0", "-0", "1", "-1", "9223372036854775807", "-9223372036854775808", "9223372036854775808",
    "-9223372036854775809", "18446744073709551615", "18446744073709551616", "-18446744073709551615",
    "-18446744073709551616", "99999999999999999999", "123456789012345678901234567890", "1e308",
    "1.7976931348623157e308", "1.7976931348623158e308", "1.7976931348623159e308", "5e-324", "4e-324",
    "2e-324", "2.4703282292062328e-324", "2.2250738585072011e-308", "2.2250738585072014e-308", "1e-400",
    "-1e-400", "1e400", "-1e400", "0.1", "-0.0", "0.0", "0e0", "-0E-0", "1E+2", "-1.5E+3", "1e23", "9007199254740993",
    "9007199254740993.0", "9007199254740992.5", "0.30000000000000004", "1.00000000000000011102230246251565404236316680908203125",
    "1.00000000000000011102230246251565404236316680908203124", "1e22", "1e-22", "123.456e-2", "7e1",
    "0.000000000000000000000000000001", "100000000000000000000000000000000e-10", "1e9999", "1e-9999", "0e9999",
    "1e10000", "0e10000", "-1e10000", "9007199254740992e22", "9007199254740993e22", "9007199254740992e-22",
    "9007199254740993e-22", "9007199254740992e23", "4.9406564584124654e-324", "0.1e-22", "0.1e23",
];

/// Grammatical number text: edge cases, Rust's own float and integer spellings, and random
/// sign / integer / fraction / exponent parts (up to 40 digits, exponents up to 6 digits).
fn number() -> impl Strategy<Value = String> {
    let digits = |n: std::ops::Range<usize>| prop::collection::vec(0u8..10, n).prop_map(|d| d.iter().map(|d| (b'0' + d) as char).collect::<String>());
    let int_part = prop_oneof![Just("0".to_string()), (1u8..10, digits(0..25)).prop_map(|(d, rest)| format!("{d}{rest}"))];
    let exp = (prop::sample::select(vec!["e", "E"]), prop::sample::select(vec!["", "+", "-"]), prop_oneof![8 => digits(1..4), 1 => digits(4..7)]);
    let composed = (any::<bool>(), int_part, prop::option::of(digits(1..40)), prop::option::of(exp)).prop_map(|(neg, i, f, e)| {
        let mut s = if neg { format!("-{i}") } else { i };
        if let Some(f) = f {
            s += &format!(".{f}");
        }
        if let Some((e, sign, d)) = e {
            s += &format!("{e}{sign}{d}");
        }
        s
    });
    prop_oneof![
        3 => prop::sample::select(EDGE_NUMBERS).prop_map(str::to_string),
        2 => any::<i64>().prop_map(|i| i.to_string()),
        1 => any::<u64>().prop_map(|u| u.to_string()),
        2 => any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(|x| format!("{x:?}")),
        1 => any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(|x| format!("{x:e}")),
        2 => (0u32..100_000, 0u32..4).prop_map(|(m, k)| format!("{}.{:0width$}", m / 100, m % 100, width = k as usize)),
        4 => composed,
    ]
    .prop_filter("grammatical", |s| !s.ends_with('.'))
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z \"\\\\/]{0,12}",
        2 => "[\\x00-\\x1f\"\\\\/a\\x7f\u{80}é€😀\u{10ffff}\u{fffd}\u{7ff}\u{800}]{0,10}",
        1 => any::<String>(),
        1 => "[a-z]{20,120}",
    ]
}

fn doc() -> impl Strategy<Value = Doc> {
    let leaf = prop_oneof![
        1 => Just(Doc::Null),
        1 => any::<bool>().prop_map(Doc::Bool),
        3 => number().prop_map(Doc::Num),
        3 => text().prop_map(Doc::Str),
    ];
    // Depth up to 5 below the top.
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Doc::List),
            prop::collection::vec((text(), inner), 0..6).prop_map(Doc::Object),
        ]
    })
}

/// Whether every number is one the fast parser promises to take (it declines exponents of
/// five or more digits and leaves them to serde).
fn ordinary(d: &Doc) -> bool {
    match d {
        Doc::Num(s) => s.split(['e', 'E']).nth(1).is_none_or(|e| e.trim_start_matches(['+', '-']).len() <= 4),
        Doc::List(xs) => xs.iter().all(ordinary),
        Doc::Object(kv) => kv.iter().all(|(_, v)| ordinary(v)),
        _ => true,
    }
}

/// Choices for writing a document out, from a seed (splitmix64).
struct Writer {
    state: u64,
    out: String,
}

impl Writer {
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.next() % n == 0
    }

    fn ws(&mut self) {
        if self.one_in(2) {
            for _ in 0..self.next() % 3 {
                let c = [' ', '\t', '\n', '\r'][(self.next() % 4) as usize];
                self.out.push(c);
            }
        }
    }

    fn u_escape(&mut self, unit: u32) {
        let s = if self.one_in(2) { format!("\\u{unit:04X}") } else { format!("\\u{unit:04x}") };
        self.out += &s;
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            let short = match c {
                '"' => Some("\\\""),
                '\\' => Some("\\\\"),
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                '\u{8}' => Some("\\b"),
                '\u{c}' => Some("\\f"),
                '/' if self.one_in(2) => Some("\\/"),
                _ => None,
            };
            let must = (c as u32) < 0x20 || c == '"' || c == '\\';
            if self.one_in(4) && (must || !self.one_in(2)) {
                let mut units = [0u16; 2];
                for &u in c.encode_utf16(&mut units).iter() {
                    self.u_escape(u as u32);
                }
            } else if let Some(e) = short {
                self.out += e;
            } else if must {
                self.u_escape(c as u32);
            } else {
                self.out.push(c);
            }
        }
        self.out.push('"');
    }

    fn doc(&mut self, d: &Doc) {
        self.ws();
        match d {
            Doc::Null => self.out += "null",
            Doc::Bool(b) => self.out += if *b { "true" } else { "false" },
            Doc::Num(s) => self.out += s,
            Doc::Str(s) => self.string(s),
            Doc::List(xs) => {
                self.out.push('[');
                self.ws();
                for (i, x) in xs.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.doc(x);
                }
                self.out.push(']');
            }
            Doc::Object(kv) => {
                self.out.push('{');
                self.ws();
                for (i, (k, v)) in kv.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.ws();
                    self.string(k);
                    self.ws();
                    self.out.push(':');
                    self.doc(v);
                }
                self.out.push('}');
            }
        }
        self.ws();
    }
}

fn write(d: &Doc, seed: u64) -> String {
    let mut w = Writer { state: seed, out: String::new() };
    w.doc(d);
    w.out
}

/// Bytes that matter to JSON, mixed with arbitrary ones.
fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        1 => any::<u8>(),
        1 => prop::sample::select(b"\"\\/{}[]:,.-+eE0123456789 \t\n\r\x00\x1fu\xc3\xa9\xff\x80tfn".to_vec()),
    ]
}

#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), byte()).prop_map(|(i, b)| Damage::Flip(i, b)),
        (any::<usize>(), byte()).prop_map(|(i, b)| Damage::Insert(i, b)),
        any::<usize>().prop_map(Damage::Delete),
        any::<usize>().prop_map(Damage::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        let n = bytes.len();
        match *d {
            Damage::Flip(i, b) if n > 0 => bytes[i % n] = b,
            Damage::Insert(i, b) => bytes.insert(i % (n + 1), b),
            Damage::Delete(i) if n > 0 => {
                bytes.remove(i % n);
            }
            Damage::Truncate(i) => bytes.truncate(i % (n + 1)),
            _ => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(cases(5000))]

    #[test]
    fn fast_parser_agrees_with_serde_on_written_documents(d in doc(), seed in any::<u64>()) {
        let text = write(&d, seed);
        check(text.as_bytes(), ordinary(&d))?;
        // The same value as a JSONL line would carry it, and inside a list.
        check(format!("[{text},{text}]").as_bytes(), ordinary(&d))?;
    }

    #[test]
    fn fast_parser_agrees_with_serde_on_damaged_documents(d in doc(), seed in any::<u64>(), damage in prop::collection::vec(damage(), 1..4)) {
        let bytes = apply(write(&d, seed).into_bytes(), &damage);
        check(&bytes, false)?;
    }
}

#[test]
fn numbers_are_typed_as_serde_types_them() {
    for n in EDGE_NUMBERS {
        for text in [n.to_string(), format!("[{n}]"), format!(" {{\"k\": {n} }} ")] {
            check(text.as_bytes(), !n.contains("e1000") && !n.contains("e9999") && !n.contains("e-9999")).unwrap();
        }
    }
    // What serde decides and the fast parser has to reproduce: -0 is a float, not Int(0).
    assert_eq!(parse_fast(b"-0").map(|v| format!("{v:?}")), Some("Float(-0.0)".to_string()));
    assert!(matches!(parse_fast(b"-9223372036854775808"), Some(Value::Int(i64::MIN))));
    assert!(matches!(parse_fast(b"18446744073709551615"), Some(Value::UInt(u64::MAX))));
    assert!(matches!(parse_fast(b"-9223372036854775809"), Some(Value::Float(x)) if x == -9223372036854775808.0));
    for bad in ["01", "-01", "+1", ".5", "1.", "1.e5", "1e", "1e+", "-", "--1", "0x10", "1e400", "-1e400", "NaN", "Infinity", "1 2"] {
        assert!(parse_fast(bad.as_bytes()).is_none(), "{bad}");
        assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
    }
}

#[test]
fn strings_borrow_unless_escaped() {
    let v = parse_fast(br#"{"a":"plain","b\n":"caf\u00e9 \ud83d\ude00","c\/":"\/"}"#).unwrap();
    let Value::Object(fields) = &v else { panic!("{v:?}") };
    assert!(matches!(&fields[0], (Cow::Borrowed("a"), Value::Str(Cow::Borrowed("plain")))));
    assert!(matches!(&fields[1].0, Cow::Owned(k) if k == "b\n"));
    assert!(matches!(&fields[1].1, Value::Str(Cow::Owned(s)) if s == "café 😀"));
    assert!(matches!(&fields[2], (Cow::Owned(k), Value::Str(Cow::Owned(s))) if k == "c/" && s == "/"));
    // Lone surrogates, unknown escapes and raw control characters: serde rejects them all.
    for bad in [r#""\ud800""#, r#""\udc00""#, r#""\ud800\u0041""#, r#""\ud800x""#, r#""\x""#, "\"a\u{1}b\"", r#""\u12""#, "\"abc"] {
        assert!(parse_fast(bad.as_bytes()).is_none(), "{bad}");
        assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
    }
    // Every special byte at every offset of an 8-byte word, so the word-at-a-time scan is
    // exercised at each position.
    for special in ["\\\"", "\\\\", "\\n", "\\u0001", "é", "\u{7f}"] {
        for pad in 0..17 {
            let text = format!("\"{}{special}{}\"", "a".repeat(pad), "b".repeat(16 - pad));
            check(text.as_bytes(), true).unwrap();
        }
    }
    for raw in [0u8, 0x1f, b'"'] {
        for pad in 0..17 {
            let mut text = format!("\"{}", "a".repeat(pad)).into_bytes();
            text.push(raw);
            text.extend_from_slice(b"bbbbbbbbbbbbbbbb\"");
            check(&text, false).unwrap();
        }
    }
}

#[test]
fn deep_nesting_is_left_to_serde() {
    for depth in [1, 99, 100, 101, 127, 128, 129, 1000] {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        check(text.as_bytes(), depth <= 100).unwrap();
        let text = format!("{}1{}", "{\"k\":".repeat(depth), "}".repeat(depth));
        check(text.as_bytes(), depth <= 100).unwrap();
    }
}

#[test]
fn whitespace_and_trailing_bytes() {
    for ok in [" \t\r\n{ } \n", "[ 1 , 2 ]", "\"x\"\r\n", "null"] {
        check(ok.as_bytes(), true).unwrap();
    }
    for bad in ["", " ", "{} x", "[1,]", "{\"a\":1,}", "{\"a\" 1}", "{1:2}", "\u{feff}{}", "[1]\u{c}", "tru", "nul", "[", "{\"a\":}"] {
        assert!(parse_fast(bad.as_bytes()).is_none(), "{bad:?}");
    }
    check(b"{\"a\":1}\xff", false).unwrap();
    check(b"{\"a\":\"\xc3\"}", false).unwrap();
}
