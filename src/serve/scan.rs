//! The fast path for inference request bodies: a cursor over the JSON that reads the
//! common body forms (TF Serving's `{"instances": [IMAGE, ...]}`, KServe v2's FP32
//! `data`, the guide's `{"input": ...}`) with their images as nested lists of numbers.
//!
//! Why our own reader and not only serde_json: serde's visitor calls cost about 50 ns
//! per number on these bodies (a 784-value image per request: about a fifth of the
//! server's CPU per request, perf), and simd-json and the like replace the whole parser
//! rather than the hot part of it. This one reads only whitespace, `[`/`]`, `{`/`}`,
//! `,`, `:`, strings without escapes and numbers, and gives up (`None`) on anything else:
//! another form (`{"b64": ...}`, an unknown key, a string with escapes, `null`),
//! invalid JSON, or a number it cannot convert exactly as serde would. The caller then
//! parses the whole body with serde, which gives the answer or the error message it
//! always gave; so this path changes speed, never results or errors.
//!
//! Numbers are converted as serde_json converts them (with its `float_roundtrip`
//! feature, which this crate enables): integers as `u64`/`i64`, then `as f32`; numbers
//! with a fraction or an exponent to the correctly rounded `f64`, then `as f32`.

use super::protocol::Nesting;

/// Lists nested deeper than this are left to serde (images are 3 deep).
const MAX_DEPTH: usize = 32;

/// A position in a JSON body.
pub(super) struct Cursor<'a> {
    raw: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(raw: &'a [u8]) -> Self {
        Cursor { raw, at: 0 }
    }

    /// The next byte that is not whitespace (not consumed).
    pub(super) fn peek(&mut self) -> Option<u8> {
        self.at = skip_whitespace(self.raw, self.at);
        self.raw.get(self.at).copied()
    }

    /// Consumes `byte`, after whitespace.
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// Only whitespace is left.
    pub(super) fn end(&mut self) -> Option<()> {
        (self.peek().is_none()).then_some(())
    }

    /// A string without escapes or control characters.
    pub(super) fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        loop {
            match *self.raw.get(self.at)? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                _ => self.at += 1,
            }
        }
        self.at += 1;
        std::str::from_utf8(&self.raw[start..self.at - 1]).ok()
    }

    /// A non-negative integer of at most 18 digits (a shape's dimension).
    pub(super) fn integer(&mut self) -> Option<u64> {
        self.peek()?;
        let start = self.at;
        let mut end = start;
        while matches!(self.raw.get(end), Some(b'0'..=b'9')) {
            end += 1;
        }
        let digits = &self.raw[start..end];
        // No leading zeros in JSON; a fraction or an exponent is for serde to judge.
        if digits.is_empty()
            || digits.len() > 18
            || (digits[0] == b'0' && digits.len() > 1)
            || matches!(self.raw.get(end), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        self.at = end;
        Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
    }

    /// A list, `item` reading each element.
    pub(super) fn list(&mut self, item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.elements(b'[', b']', item)
    }

    /// An object, `member` reading each value after its key.
    pub(super) fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        self.elements(b'{', b'}', |cursor| {
            let key = cursor.string()?;
            cursor.eat(b':')?;
            member(cursor, key)
        })
    }

    /// `open`, elements separated by commas (none after the last), `close`.
    fn elements(
        &mut self,
        open: u8,
        close: u8,
        mut element: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.eat(open)?;
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            element(self)?;
            match self.peek()? {
                b',' => self.at += 1,
                byte if byte == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Appends every number of the value here, a list of numbers nested to any depth or
    /// a lone number, to `values`, and records its nesting from `depth` in `nesting`, which
    /// must be fresh (`Nesting::default()`, as at every call site), as serde's path
    /// (`FlattenInto`) would. A ragged value (lists of different lengths at one depth,
    /// numbers at different depths) is left to serde (`None`), so its error message is
    /// serde's path's. On `None`, `values` and `nesting` may be partly written.
    pub(super) fn numbers(
        &mut self,
        depth: usize,
        values: &mut Vec<f32>,
        nesting: &mut Nesting,
    ) -> Option<()> {
        // A regular value recorded into a fresh `Nesting` gives serde's state whatever
        // the order of the calls; into a used one, the first irregularity reported could
        // differ from serde's.
        debug_assert_eq!(
            *nesting,
            Nesting::default(),
            "numbers() needs a fresh Nesting"
        );
        let raw = self.raw;
        // Values seen so far in each open list.
        let mut lens = [0usize; MAX_DEPTH];
        // The length of the lists at each depth (all must match) and the depth of the
        // numbers, kept here and given to `nesting` once at the end: a call into it per
        // list closed cost a tenth of the scan (perf).
        let mut dims = [UNSEEN; MAX_DEPTH];
        let mut deepest = 0;
        let mut leaf = UNSEEN;
        let mut open = 0;
        let mut i = skip_whitespace(raw, self.at);
        loop {
            // A value starts at `i`.
            if *raw.get(i)? == b'[' {
                if open == MAX_DEPTH {
                    return None;
                }
                lens[open] = 0;
                open += 1;
                deepest = deepest.max(open);
                i = skip_whitespace(raw, i + 1);
                if *raw.get(i)? != b']' {
                    continue;
                }
                // `[]`: closed at once, then a value of its parent.
                i += 1;
                open -= 1;
                same_length(&mut dims[open], 0)?;
            } else {
                let (value, end) = number(raw, i)?;
                if leaf != open {
                    if leaf != UNSEEN {
                        return None;
                    }
                    leaf = open;
                }
                values.push(value);
                i = end;
            }
            // After a value: the end, a comma and the next value, or lists closing.
            loop {
                if open == 0 {
                    self.at = i;
                    // The value is regular: into a fresh `Nesting`, one call per depth
                    // records what serde's path records with a call per number and list.
                    if leaf != UNSEEN {
                        nesting.number(depth + leaf);
                    }
                    for d in (0..deepest).rev() {
                        nesting.list(depth + d, dims[d]);
                    }
                    return Some(());
                }
                lens[open - 1] += 1;
                i = skip_whitespace(raw, i);
                match *raw.get(i)? {
                    b',' => {
                        i = skip_whitespace(raw, i + 1);
                        break;
                    }
                    b']' => {
                        i += 1;
                        open -= 1;
                        same_length(&mut dims[open], lens[open])?;
                    }
                    _ => return None,
                }
            }
        }
    }
}

/// No list length or number depth seen yet.
const UNSEEN: usize = usize::MAX;

/// Records a list length at one depth: the first one, or `None` when it differs from it.
#[inline(always)]
fn same_length(first: &mut usize, len: usize) -> Option<()> {
    if *first != len {
        if *first != UNSEEN {
            return None;
        }
        *first = len;
    }
    Some(())
}

/// JSON's whitespace (RFC 8259: space, tab, line feed, carriage return).
#[inline]
fn skip_whitespace(raw: &[u8], mut i: usize) -> usize {
    while matches!(raw.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Reads the run of decimal digits at `i` into `mantissa` (`mantissa * 10^n + digits`,
/// wrapping past 19 digits: the caller bounds the count) and returns its length `n`.
/// Eight bytes at a time where the body has them (SWAR, as in simdjson and fast_float:
/// a per-digit multiply-add chain cost more than the rest of a number's parsing).
#[inline]
fn digit_run(raw: &[u8], mut i: usize, mantissa: &mut u64) -> usize {
    let start = i;
    while let Some(chunk) = raw.get(i..i + 8) {
        let bytes = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        // Per byte: a high nibble other than 3, or a low nibble above 9, is not a digit.
        let high = (bytes & 0xF0F0_F0F0_F0F0_F0F0) ^ 0x3030_3030_3030_3030;
        let low = ((bytes & 0x0F0F_0F0F_0F0F_0F0F) + 0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0;
        let n = ((high | low).trailing_zeros() / 8) as usize;
        if n == 0 {
            return i - start;
        }
        // The first n digits (the first byte is the most significant), as leading zeros
        // before them; then pairs, quads and the eight combined by multiplications.
        let mut v = (bytes & 0x0F0F_0F0F_0F0F_0F0F) << (8 * (8 - n));
        v = (v.wrapping_mul(10) + (v >> 8)) & 0x00FF_00FF_00FF_00FF;
        v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
        v = (v.wrapping_mul(10_000) + (v >> 32)) & 0xFFFF_FFFF;
        *mantissa = mantissa.wrapping_mul(POWERS_OF_TEN_U64[n]).wrapping_add(v);
        i += n;
        if n < 8 {
            return i - start;
        }
    }
    while let Some(&d @ b'0'..=b'9') = raw.get(i) {
        *mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
        i += 1;
    }
    i - start
}

/// 10^n for a run of n <= 8 digits.
const POWERS_OF_TEN_U64: [u64; 9] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
];

/// `mantissa x 10^scale` as an `f32` when rounding a close `f64` approximation to `f32`
/// provably gives what rounding the correctly rounded `f64` gives (serde's path):
/// for mantissas of 17-19 digits (Python writes doubles with 17), past Clinger's exact
/// range. `mantissa as f64` and the multiply or divide each round once, so the
/// approximation lies within 2 units in the last place (ulps) of the exact value, and
/// the correctly rounded `f64` within 3 ulps of it; both round to the same `f32` unless
/// an `f32` rounding midpoint (low 29 of the `f64`'s 52 fraction bits `1000...0`) lies
/// within 4 ulps, or the value is not a normal `f32`: then `None`, and std parses it.
#[inline]
fn near_f32(mantissa: u64, scale: i64) -> Option<f32> {
    let power = POWERS_OF_TEN[scale.unsigned_abs() as usize];
    let approx = if scale < 0 {
        mantissa as f64 / power
    } else {
        mantissa as f64 * power
    };
    const LOW: u64 = (1 << 29) - 1;
    const MIDPOINT: u64 = 1 << 28;
    let near_midpoint = (approx.to_bits() & LOW).abs_diff(MIDPOINT) <= 4;
    let normal = (f64::from(f32::MIN_POSITIVE)..=f64::from(f32::MAX)).contains(&approx);
    (normal && !near_midpoint).then_some(approx as f32)
}

/// Exact powers of ten in `f64` (10^22 is the largest).
const POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// The JSON number at `start` (RFC 8259's grammar) as serde_json would give it as an
/// `f32`, and where it ends; `None` for what is not one, or for what serde must judge
/// (an integer of more than 18 digits, a value beyond the `f32` range).
#[inline]
fn number(raw: &[u8], start: usize) -> Option<(f32, usize)> {
    let negative = raw.get(start) == Some(&b'-');
    let mut i = start + usize::from(negative);
    // The digits as one integer while they fit (at most 19), and the power of ten that
    // scales it: "12.5e3" is 125 x 10^2.
    let (mut mantissa, mut digits) = (0u64, 0usize);
    match *raw.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => {
            let run = digit_run(raw, i, &mut mantissa);
            digits += run;
            i += run;
        }
        _ => return None,
    }
    let integer_end = i;
    let mut scale = 0i64;
    if raw.get(i) == Some(&b'.') {
        i += 1;
        let run = digit_run(raw, i, &mut mantissa);
        if run == 0 {
            return None;
        }
        // (Leading zeros, as in "0.003", count too: a bound, not the significant digits.)
        digits += run;
        i += run;
        scale = -(run as i64);
    }
    if matches!(raw.get(i), Some(b'e' | b'E')) {
        i += 1;
        let sign = match raw.get(i) {
            Some(b'-') => -1,
            Some(b'+') => 1,
            _ => 0,
        };
        i += usize::from(sign != 0);
        let exponent = i;
        let mut e = 0i64;
        while let Some(&d @ b'0'..=b'9') = raw.get(i) {
            e = (e * 10 + i64::from(d - b'0')).min(1 << 20);
            i += 1;
        }
        if i == exponent {
            return None;
        }
        scale += if sign < 0 { -e } else { e };
    }
    let value = if mantissa == 0 && digits <= 19 {
        // Zero, however written ("0", "0.0", "0e5"): no division needed (serde's `-0`
        // integer and `-0.0` float are both -0.0, the sign applied below). Up to 19
        // digits the mantissa cannot have wrapped to 0.
        0.0
    } else if i == integer_end {
        // An integer: serde_json reads it as u64 (or i64 when negative), then `as f32`
        // rounds it once (the same magnitude either sign); `-0` it reads as the float
        // -0.0.
        if digits > 18 {
            return None;
        }
        mantissa as f32
    } else if digits <= 19 && mantissa < 1 << 53 && scale.unsigned_abs() <= 22 {
        // Clinger's fast path: both operands are exact in f64, so the one IEEE multiply
        // or divide rounds correctly, as any correct parser (std's, serde_json's with
        // `float_roundtrip`) would.
        let power = POWERS_OF_TEN[scale.unsigned_abs() as usize];
        let exact = mantissa as f64;
        let value = if scale < 0 {
            exact / power
        } else {
            exact * power
        };
        value as f32
    } else if let Some(value) = (digits <= 19 && scale.unsigned_abs() <= 22)
        .then(|| near_f32(mantissa, scale))
        .flatten()
    {
        value
    } else {
        // Long or far-scaled numbers: std's parser (Eisel-Lemire, correctly rounded).
        // Only ASCII digits, signs, `.` and `e` were accepted above.
        let text = std::str::from_utf8(&raw[start + usize::from(negative)..i]).ok()?;
        text.parse::<f64>().ok()? as f32
    };
    if !value.is_finite() {
        return None;
    }
    Some((if negative { -value } else { value }, i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::Deserializer;

    /// What the serde path gives for `text`: values and nesting, or `None` on an error.
    fn by_serde(text: &str) -> Option<(Vec<f32>, Nesting)> {
        let (mut values, mut nesting) = (Vec::new(), Nesting::default());
        let mut de = serde_json::Deserializer::from_str(text);
        let seed = super::super::protocol::FlattenInto::new(&mut values, &mut nesting);
        de.deserialize_any(seed).ok()?;
        de.end().ok()?;
        Some((values, nesting))
    }

    fn by_scanner(text: &str) -> Option<(Vec<f32>, Nesting)> {
        let (mut values, mut nesting) = (Vec::new(), Nesting::default());
        let mut cursor = Cursor::new(text.as_bytes());
        cursor.numbers(0, &mut values, &mut nesting)?;
        cursor.end()?;
        Some((values, nesting))
    }

    /// Every body the scanner takes gives the serde path's values bit for bit and its
    /// nesting; what it leaves (objects, strings, bad JSON, numbers for serde to judge)
    /// is `None`.
    #[test]
    fn scanner_agrees_with_serde_or_leaves_it_the_body() {
        let taken = [
            "[]",
            "[[]]",
            "[[[]], [[]]]",
            "0",
            "[0e5, -0e-5, 0.0000000000000000000000, -0.000, 0E+999999]",
            " -0 ",
            "[0, -0, 1, -1, 7, 16777217, -16777217, 123456789012345678]",
            "[0.0, -0.0, 0.5, -2.5e3, 1E-3, 1e+2, 6.02214076e23, 0.3254901960784314]",
            "[3.4028235e38, -3.4028234e38, 1e-46, 1.401298464324817e-45, 9.999999e-39]",
            // Halfway cases of f32 and f64 rounding, long mantissas.
            "[16777216.5, 16777217.0, 0.1000000000000000055511151231257827, 1.00000005960464477539062500001]",
            "[[[0.1], [0.2]], [[0.3], [0.4]]]",
            " [ 1 ,\t2 ,\n3\r] ",
        ];
        for text in taken {
            let want = by_serde(text).unwrap_or_else(|| panic!("serde refused {text}"));
            let got = by_scanner(text).unwrap_or_else(|| panic!("scanner left {text}"));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.0), bits(&want.0), "{text}");
            assert_eq!(got.1, want.1, "{text}");
        }
        let left = [
            "",
            "[",
            "[1,]",
            "[,1]",
            "[1 2]",
            "[01]",
            "[1.]",
            "[.5]",
            "[1e]",
            "[+1]",
            "[-]",
            "[1]]",
            "[1] x",
            "[NaN]",
            "[\"1\"]",
            "[{\"b64\": \"\"}]",
            "[null]",
            "[true]",
            "[1e39]",
            "[-1e400]",
            "[1234567890123456789]",
            // 2^64: its digits wrap the mantissa to 0.
            "[18446744073709551616]",
            // Ragged: serde's path words the error.
            "[[1, 2], [3]]",
            "[[1, [2]], 3]",
            "[[], [[]]]",
            "[[1], []]",
        ];
        for text in left {
            assert!(by_scanner(text).is_none(), "{text} was taken");
        }
        let deep = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(by_scanner(&deep).is_none());
        assert!(by_serde(&deep).is_some());
    }

    /// Numbers of 17-19 digits at and next to every kind of `f32` rounding midpoint, and
    /// Python's reprs of `p / 255`: the approximate path gives serde's bits or leaves the
    /// number to std.
    #[test]
    fn long_numbers_near_f32_midpoints_agree_with_serde() {
        let mut numbers: Vec<String> = (0..=255)
            .map(|p| format!("{:?}", p as f64 / 255.0))
            .collect();
        for bits in (0x0080_0000u32..0x7f00_0000).step_by(0x0013_3337) {
            let v = f32::from_bits(bits);
            let midpoint = (f64::from(v) + f64::from(f32::from_bits(bits + 1))) / 2.0;
            for x in [midpoint, f64::from(v)] {
                for nudge in -3i64..=3 {
                    let x = f64::from_bits((x.to_bits() as i64 + nudge) as u64);
                    numbers.push(format!("{x:.16e}"));
                    numbers.push(format!("{x:.18e}"));
                    numbers.push(format!("{x:?}"));
                }
            }
        }
        let text = format!("[{}]", numbers.join(","));
        let want = by_serde(&text).unwrap();
        let got = by_scanner(&text).unwrap();
        for (i, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{}: {g} vs {w}", numbers[i]);
        }
        assert_eq!(got.0.len(), numbers.len());
    }

    /// 17-19 digit numbers between 0.001 and 1000 (scales within 10^22, so they take the
    /// approximate path, not std's) next to `f32` rounding midpoints.
    #[test]
    fn approximations_near_midpoints_agree_with_serde() {
        let (low, high) = (0.001f32.to_bits(), 1000f32.to_bits());
        let mut numbers = Vec::new();
        for bits in (low..high).step_by(0x0000_3f3f) {
            let v = f32::from_bits(bits);
            let midpoint = (f64::from(v) + f64::from(f32::from_bits(bits + 1))) / 2.0;
            for nudge in -2i64..=2 {
                let x = f64::from_bits((midpoint.to_bits() as i64 + nudge) as u64);
                numbers.push(format!("{x:?}"));
                numbers.push(format!("{x:.17}"));
            }
        }
        let text = format!("[{}]", numbers.join(","));
        let (want, got) = (by_serde(&text).unwrap(), by_scanner(&text).unwrap());
        for (i, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{}: {g} vs {w}", numbers[i]);
        }
        assert_eq!(got.0.len(), numbers.len());
    }

    /// Every prefix of a body (a client that stopped sending) is left to serde or read
    /// exactly as serde reads it.
    #[test]
    fn prefixes_are_left_or_agree() {
        let text = "[[[0.5], [-1e-3]], [[12], [0.050980392156862744]], [[], [7E+2]]]  ";
        for end in 0..=text.len() {
            let prefix = &text[..end];
            if let Some(got) = by_scanner(prefix) {
                assert_eq!(Some(got), by_serde(prefix), "{prefix:?}");
            }
        }
    }

    /// Random bodies: values of every magnitude written the ways clients write them.
    #[test]
    fn random_numbers_agree_with_serde() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200 {
            let numbers: Vec<String> = (0..64)
                .map(|_| {
                    let r = next();
                    let x = f64::from_bits(r) % 1e6;
                    let x = if x.is_finite() {
                        x
                    } else {
                        (r % 1000) as f64 / 7.0
                    };
                    match r % 5 {
                        0 => format!("{x}"),
                        1 => format!("{:e}", x as f32),
                        2 => format!("{:.4}", x / 1e6),
                        3 => format!("{}", (r >> 20) as i64 - (1 << 43)),
                        _ => format!("{}", x as f32),
                    }
                })
                .collect();
            let text = format!("[[{}]]", numbers.join(", "));
            let want = by_serde(&text).unwrap();
            let got = by_scanner(&text).unwrap();
            for (i, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{}: {g} vs {w}", numbers[i]);
            }
        }
    }
}

#[cfg(test)]
mod timing {
    /// Not a test: ns per number, serde's visitor vs the scanner (run with --ignored).
    #[test]
    #[ignore]
    fn time_scanner_against_serde() {
        use serde::de::Deserializer;
        // `sixths`: that many pixels of every 6 are `0.0` (MNIST digits are ~80% zeros).
        let image = |digits: usize, sixths: usize| {
            let rows: Vec<String> = (0..28)
                .map(|r| {
                    let px: Vec<String> = (0..28)
                        .map(|c| {
                            let p = ((r * 28 + c) * 37 % 256) as f64 / 255.0;
                            let p = if (r * 28 + c) % 6 < sixths { 0.0 } else { p };
                            if digits == 0 || p == 0.0 {
                                format!("[{p:?}]")
                            } else {
                                format!("[{:.*}]", digits, p)
                            }
                        })
                        .collect();
                    format!("[{}]", px.join(", "))
                })
                .collect();
            format!("[{}]", rows.join(", "))
        };
        let cases = [
            ("4 decimals, 1/3 zeros", image(4, 2)),
            ("4 decimals, 5/6 zeros", image(4, 5)),
            ("full f64, 1/3 zeros", image(0, 2)),
        ];
        for (name, text) in cases {
            let runs = 2000;
            let t = std::time::Instant::now();
            for _ in 0..runs {
                let (mut v, mut n) = (Vec::<f32>::new(), super::Nesting::default());
                let mut de = serde_json::Deserializer::from_str(&text);
                de.deserialize_any(super::super::protocol::FlattenInto::new(&mut v, &mut n))
                    .unwrap();
                std::hint::black_box(&v);
            }
            let serde = t.elapsed().as_nanos() as f64 / (runs * 784) as f64;
            let t = std::time::Instant::now();
            for _ in 0..runs {
                let (mut v, mut n) = (Vec::new(), super::Nesting::default());
                let mut cursor = super::Cursor::new(text.as_bytes());
                cursor.numbers(0, &mut v, &mut n).unwrap();
                std::hint::black_box(&v);
            }
            let scan = t.elapsed().as_nanos() as f64 / (runs * 784) as f64;
            eprintln!("{name}: serde {serde:.1} ns/number, scanner {scan:.1}");
        }
    }
}
