//! Checks that change nothing: ids, amounts and event time (R9).

use super::{Deduction, Meter, MeterError};
use crate::calendar::{self, hour_start, Ts, HOUR, SECOND};

/// Longest account id accepted, in bytes.
pub const MAX_ACCOUNT_ID_BYTES: usize = 128;
/// Longest request id accepted, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// Checks an account id: 1–128 bytes, no control characters.
pub fn validate_account_id(id: &str) -> Result<(), MeterError> {
    if id.is_empty() {
        return Err(MeterError::InvalidAccountId("is empty"));
    }
    if id.len() > MAX_ACCOUNT_ID_BYTES {
        return Err(MeterError::InvalidAccountId("is longer than 128 bytes"));
    }
    if has_control(id) {
        return Err(MeterError::InvalidAccountId("contains a control character"));
    }
    Ok(())
}

fn validate_request_id(id: &str) -> Result<(), MeterError> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(MeterError::InvalidRequestId("is longer than 256 bytes"));
    }
    // Most deductions carry none: no call to scan nothing.
    if !id.is_empty() && has_control(id) {
        return Err(MeterError::InvalidRequestId("contains a control character"));
    }
    Ok(())
}

/// Whether `s` holds a control character (`char::is_control`: U+0000–U+001F
/// and U+007F–U+009F). Every deduction checks two ids, so this first looks
/// for suspect bytes eight at a time, in a word, instead of decoding
/// characters one by one (about 9 instructions a byte, a tenth of a
/// batched deduction's cost in callgrind; a byte loop, even vectorized,
/// ran its scalar tail over most of a 15-byte id, about 7 a byte). In
/// UTF-8 the C0 controls and DEL are the bytes below 0x20 and 0x7F, and
/// the C1 controls start with 0xC2; only a string with one of those bytes
/// gets the exact check. The ids are at most 256 bytes.
fn has_control(s: &str) -> bool {
    let b = s.as_bytes();
    let suspect = match b.len() {
        0 => 0,
        1..=7 => {
            // Padded with a byte that is no suspect.
            let mut w = [b'a'; 8];
            w[..b.len()].copy_from_slice(b);
            suspect_bytes(&w)
        }
        // Most ids: two words, overlapping when shorter than 16 bytes,
        // with no loop.
        8..=16 => suspect_bytes(&b[..8]) | suspect_bytes(&b[b.len() - 8..]),
        _ => {
            let mut suspect = 0;
            let mut words = b.chunks_exact(8);
            for w in &mut words {
                suspect |= suspect_bytes(w);
            }
            if !words.remainder().is_empty() {
                // The last eight bytes, overlapping the last whole word.
                suspect |= suspect_bytes(&b[b.len() - 8..]);
            }
            suspect
        }
    };
    suspect != 0 && s.chars().any(char::is_control)
}

/// Non-zero if one of the eight bytes is below 0x20, 0x7F or 0xC2: the
/// word tricks for "a byte less than n" and "a zero byte" (Hacker's
/// Delight), which are exact as to whether there is one.
fn suspect_bytes(w: &[u8]) -> u64 {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    let w = u64::from_le_bytes(w.try_into().expect("eight bytes"));
    let below = |n: u64| w.wrapping_sub(ONES * n) & !w & HIGH;
    let equal = |n: u64| {
        let x = w ^ (ONES * n);
        x.wrapping_sub(ONES) & !x & HIGH
    };
    below(0x20) | equal(0x7f) | equal(0xc2)
}

impl Meter {
    /// Validates a deduction against the configured limits and R9 at `now`,
    /// and returns its event time. Changes nothing.
    pub fn validate(&self, account_id: &str, d: &Deduction<'_>, now: Ts) -> Result<Ts, MeterError> {
        validate_account_id(account_id)?;
        self.validate_deduction(d, now)
    }

    /// [`validate`](Self::validate) of everything but the account id: for a
    /// request whose account is resident, whose id was checked when it
    /// became resident (see `Meter::touch_resident`).
    pub fn validate_deduction(&self, d: &Deduction<'_>, now: Ts) -> Result<Ts, MeterError> {
        validate_request_id(d.request_id)?;
        if d.calls > self.cfg.max_calls {
            return Err(MeterError::AmountTooLarge {
                field: "calls",
                value: d.calls,
                max: self.cfg.max_calls,
            });
        }
        if d.egress_bytes > self.cfg.max_egress_bytes {
            return Err(MeterError::AmountTooLarge {
                field: "egress_bytes",
                value: d.egress_bytes,
                max: self.cfg.max_egress_bytes,
            });
        }
        match d.at {
            Some(at) => self.validate_time(at, now, Ts::MIN),
            // The clock's own hour is open at `now`: only the settled mark,
            // which the deduction checks under its pass, can refuse it.
            None => Ok(now),
        }
    }

    /// R9 at `now`: `at` is not too far ahead, and its hour is neither
    /// closed by the clock nor settled (before `settled_before`).
    pub(super) fn validate_time(
        &self,
        at: Ts,
        now: Ts,
        settled_before: Ts,
    ) -> Result<Ts, MeterError> {
        if at.saturating_sub(now) > self.cfg.max_future_skew {
            return Err(MeterError::TooFarInFuture {
                ahead_ms: at.saturating_sub(now) / 1000,
                max_ms: self.cfg.max_future_skew / 1000,
            });
        }
        // One division: this runs on every deduction.
        let hour = hour_start(at);
        let closes = hour
            .saturating_add(HOUR)
            .saturating_add(self.cfg.late_grace);
        if closes <= now || hour < settled_before {
            return Err(MeterError::HourClosed {
                hour: calendar::to_datetime(hour).to_rfc3339(),
                closed_at: calendar::to_datetime(closes.min(now)).to_rfc3339(),
                grace_s: self.cfg.late_grace / SECOND,
            });
        }
        Ok(at)
    }

    /// When the hour holding `at` closes (R9): its end plus the late grace.
    pub fn hour_closes(&self, at: Ts) -> Ts {
        hour_start(at)
            .saturating_add(HOUR)
            .saturating_add(self.cfg.late_grace)
    }

    /// Hours that start before this have closed at `now` (R9).
    pub fn closed_before(&self, now: Ts) -> Ts {
        hour_start(now.saturating_sub(self.cfg.late_grace))
    }
}

#[cfg(test)]
mod tests {
    use super::has_control;

    /// A suspect byte is found wherever it falls among the words: in a
    /// whole word, in the overlapping last one, or in a padded short id.
    #[test]
    fn the_word_scan_finds_a_control_character_at_every_place() {
        for len in 1..40 {
            for at in 0..len {
                for c in ['\0', '\u{1f}', '\u{7f}', '\u{80}', '\u{9f}'] {
                    let mut s: String = "x".repeat(len);
                    s.replace_range(at..=at, &c.to_string());
                    assert!(has_control(&s), "{c:?} at {at} of {s:?}");
                }
                // Near misses: the bytes around the suspect ones.
                for c in [' ', '~', '\u{a0}', '\u{c1}', '\u{100}'] {
                    let mut s: String = "x".repeat(len);
                    s.replace_range(at..=at, &c.to_string());
                    assert!(!has_control(&s), "{c:?} at {at} of {s:?}");
                }
            }
        }
    }

    #[test]
    fn the_byte_scan_finds_exactly_the_control_characters() {
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            for s in [
                c.to_string(),
                format!("acct-{c}-9"),
                format!("\u{e9}{c}"),
                format!("loadgen-00{c}01234-x"),
            ] {
                assert_eq!(has_control(&s), c.is_control(), "{c:?} in {s:?}");
            }
        }
    }
}
