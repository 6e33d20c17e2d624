//! The fast path for the request bodies nearly every client sends: a JSON object whose one
//! key holds nested lists of plain numbers (`{"instances": [[[[0.0], ...]]]}`).
//!
//! serde_json reads such a body through its generic visitor machinery, one call per number
//! and per one-element list, which cost about as much as the int8 forward pass (perf: 19%
//! of the server's CPU at concurrency 64, fp32). This scanner reads the same bytes in one
//! pass. It is deliberately narrow: it accepts only what it can read to exactly the result
//! of the serde path (the same values, the same [`super::protocol`] nesting record in the
//! same order), and answers `None` for anything else (another key, an object or a string
//! where a number may be, escapes, a number it does not convert exactly, deep nesting), so
//! the caller falls back to serde, which also produces every error message. Written here
//! because no JSON crate exposes a numbers-only fast path with serde_json's number
//! semantics; the fallback keeps serde_json as the one definition of what a body means.

/// Powers of ten exactly representable in f64 (Clinger's fast path).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// How deep lists may nest here (serde_json's own limit is 128; deeper goes to serde).
const MAX_DEPTH: usize = 32;

/// A cursor over the body.
pub(crate) struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// What the scanner calls for each list and number, in serde's visiting order.
pub(crate) trait Record {
    /// A number at `depth`.
    fn number(&mut self, depth: usize, value: f32);
    /// A list at `depth` has ended, holding `len` elements.
    fn list(&mut self, depth: usize, len: usize);
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Scanner { bytes, at: 0 }
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// Consumes `byte` (after whitespace) or fails.
    #[inline]
    pub(crate) fn expect(&mut self, byte: u8) -> Option<()> {
        self.skip_ws();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// Whether the next token (after whitespace) is `byte`, consuming it if so.
    #[inline]
    pub(crate) fn eat(&mut self, byte: u8) -> bool {
        self.skip_ws();
        let yes = self.peek() == Some(byte);
        if yes {
            self.at += 1;
        }
        yes
    }

    /// A string without escapes (object keys); `None` for anything else.
    pub(crate) fn key(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.at;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                _ => self.at += 1,
            }
        }
        let key = &self.bytes[start..self.at];
        self.at += 1;
        Some(key)
    }

    /// Only whitespace is left.
    pub(crate) fn at_end(&mut self) -> bool {
        self.skip_ws();
        self.at == self.bytes.len()
    }

    /// Whether the next value (after whitespace) starts a list.
    pub(crate) fn at_list(&mut self) -> bool {
        self.skip_ws();
        self.peek() == Some(b'[')
    }

    /// A number or nested lists of numbers at `depth`, reported to `record` as serde's
    /// visitor sees them: a list's elements first, then the list itself.
    pub(crate) fn value(&mut self, depth: usize, record: &mut impl Record) -> Option<()> {
        self.skip_ws();
        if self.peek()? != b'[' {
            let v = self.number()?;
            record.number(depth, v);
            return Some(());
        }
        if depth >= MAX_DEPTH {
            return None;
        }
        self.at += 1;
        let mut len = 0;
        if !self.eat(b']') {
            loop {
                self.value(depth + 1, record)?;
                len += 1;
                if self.eat(b',') {
                    continue;
                }
                self.expect(b']')?;
                break;
            }
        }
        record.list(depth, len);
        Some(())
    }

    /// A JSON number as serde_json (with its `float_roundtrip` feature: correctly rounded)
    /// reads it for our visitors, as f32: an integer that fits in 64 bits converted from
    /// the integer, anything else from the correctly rounded f64. `None` for what is not a
    /// JSON number, an integer of more than 18 digits, or a value not finite in f32 (left
    /// to serde, which says what is wrong).
    #[inline]
    fn number(&mut self) -> Option<f32> {
        let b = self.bytes;
        let start = self.at;
        let mut i = start;
        let negative = b.get(i) == Some(&b'-');
        if negative {
            i += 1;
        }
        // Integer part: 0, or 1-9 then digits.
        let mut mantissa: u64 = 0;
        let mut digits = 0usize;
        match b.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => {
                while let Some(&d @ b'0'..=b'9') = b.get(i) {
                    mantissa = mantissa.wrapping_mul(10).wrapping_add((d - b'0') as u64);
                    digits += 1;
                    i += 1;
                }
            }
            _ => return None,
        }
        let mut fraction_digits = 0usize;
        let mut is_float = false;
        if b.get(i) == Some(&b'.') {
            is_float = true;
            i += 1;
            let before = i;
            while let Some(&d @ b'0'..=b'9') = b.get(i) {
                if mantissa != 0 || d != b'0' {
                    digits += 1;
                }
                mantissa = mantissa.wrapping_mul(10).wrapping_add((d - b'0') as u64);
                fraction_digits += 1;
                i += 1;
            }
            if i == before {
                return None;
            }
        }
        let mut exponent = false;
        if matches!(b.get(i), Some(b'e' | b'E')) {
            exponent = true;
            is_float = true;
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let before = i;
            while let Some(b'0'..=b'9') = b.get(i) {
                i += 1;
            }
            if i == before {
                return None;
            }
        }
        self.at = i;
        if !is_float {
            if digits > 18 {
                return None; // may not fit in 64 bits: serde decides
            }
            // serde_json: u64 (non-negative) or i64 (negative), then our `as f32`; `-0`
            // is the float -0.0 there.
            return Some(match (negative, mantissa) {
                (false, m) => m as f32,
                (true, 0) => -0.0,
                (true, m) => -(m as i64) as f32,
            });
        }
        let v = if !exponent && digits <= 15 && fraction_digits <= 22 {
            // Clinger's fast path: mantissa and 10^k both exact in f64, one correctly
            // rounded division.
            let v = mantissa as f64 / POW10[fraction_digits];
            if negative {
                -v
            } else {
                v
            }
        } else {
            // Long mantissas (`x / 255.0` from Python has 16-17 digits) and exponents: the
            // standard library's correctly rounded parse of the validated literal.
            std::str::from_utf8(&b[start..i])
                .ok()?
                .parse::<f64>()
                .ok()?
        };
        // Correctly rounded f64 either way, as serde_json with `float_roundtrip` reads it.
        let v = v as f32;
        v.is_finite().then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Debug, PartialEq)]
    struct Log(Vec<String>, Vec<f32>);

    impl Record for Log {
        fn number(&mut self, depth: usize, value: f32) {
            self.0.push(format!("n{depth}"));
            self.1.push(value);
        }
        fn list(&mut self, depth: usize, len: usize) {
            self.0.push(format!("l{depth}:{len}"));
        }
    }

    fn scan(text: &str) -> Option<Log> {
        let mut s = Scanner::new(text.as_bytes());
        let mut log = Log::default();
        s.value(0, &mut log)?;
        s.at_end().then_some(log)
    }

    /// Every literal gives serde_json's value (read as f64 or integer, then `as f32`), bit
    /// for bit; what the fast path leaves to serde is `None`.
    #[test]
    fn numbers_read_as_serde_json_reads_them() {
        let literals = [
            "0",
            "-0",
            "1",
            "255",
            "-17",
            "0.5",
            "0.1234",
            "0.0001",
            "1.0",
            "-0.25",
            "3.14159",
            "123456789012.345",
            "0.000000000000000000001",
            "999999999999999",
            "16777217",
            "18446744073",
            "0.300000000000004",
            "1.79769313486231",
            "0.30000000000000004",
            "0.5019607843137255",
            "0.12345678901234567",
            "1e5",
            "1E-3",
            "-2.5e+2",
            "7.00000000000000000000000000000000001",
            "1e-50",
            "123456789012345678.5",
            "0.000000000000000000000000000000000000001401298464324817",
            "3.4028234663852886e38",
        ];
        for text in literals {
            let want = match serde_json::from_str::<serde_json::Value>(text).unwrap() {
                serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                    (Some(u), _) => u as f32,
                    (None, Some(i)) => i as f32,
                    _ => n.as_f64().unwrap() as f32,
                },
                _ => unreachable!(),
            };
            let got = scan(text).unwrap_or_else(|| panic!("{text} went to serde"));
            assert_eq!(got.1[0].to_bits(), want.to_bits(), "{text}");
        }
        for text in [
            "01",
            "1.",
            ".5",
            "-",
            "+1",
            "1e",
            "1e+",
            "NaN",
            "\"1\"",
            "true",
            "1.5.2",
            "12345678901234567890",
            "1e39",
            "3.4028235677973366e38",
            "[1,]",
            "[,1]",
            "[1 2]",
            "{}",
        ] {
            assert!(scan(text).is_none(), "{text} was accepted");
        }
    }

    /// Lists report their elements first, then themselves, as serde's visitor does.
    #[test]
    fn nesting_is_reported_in_visiting_order() {
        let log = scan(" [ [1, 2] ,[ [3] ], [] ] ").unwrap();
        assert_eq!(
            log.0,
            ["n2", "n2", "l1:2", "n3", "l2:1", "l1:1", "l1:0", "l0:3"]
        );
        assert_eq!(log.1, [1.0, 2.0, 3.0]);
        let deep = "[".repeat(40) + &"]".repeat(40);
        assert!(scan(&deep).is_none());
    }
}
