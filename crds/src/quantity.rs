//! Kubernetes quantities (`100m`, `1.5`, `2Gi`, `1e3`), read the way the API server reads them,
//! shared by the operator (resource requests, bandwidth limits) and the agent (its byte budget).

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// A Kubernetes quantity in milli-units: `100m` -> 100, `1` -> 1000, `1Ki` -> 1_024_000.
pub fn milli(q: &Quantity) -> Option<i128> {
    let s = q.0.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return None;
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let int: i128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().ok()?
    };
    // Fractions are kept to nine digits: nano-units are finer than any resource needs.
    let frac9: String = frac_part.chars().take(9).collect();
    let frac: i128 = if frac9.is_empty() {
        0
    } else {
        format!("{frac9:0<9}").parse().ok()?
    };
    let nanos = int.checked_mul(1_000_000_000)? + frac;
    let (mul, div): (i128, i128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        exp if exp.starts_with(['e', 'E']) => (10i128.checked_pow(exp[1..].parse().ok()?)?, 1),
        _ => return None,
    };
    // milli-units = nanos * mul / div / 10^6
    let value = nanos.checked_mul(mul)? / div / 1_000_000;
    Some(if negative { -value } else { value })
}

/// A byte count given as a quantity (`20Gi`, `500M`, `1048576`); `None` when it is not a
/// quantity, is negative or is a fraction of a byte.
pub fn bytes(q: &str) -> Option<u64> {
    let milli = milli(&Quantity(q.into()))?;
    (milli % 1000 == 0)
        .then(|| u64::try_from(milli / 1000).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    #[test]
    fn quantities_parse_to_milli_units() {
        assert_eq!(milli(&q("100m")), Some(100));
        assert_eq!(milli(&q("1.5")), Some(1500));
        assert_eq!(milli(&q("1Ki")), Some(1_024_000));
        assert_eq!(milli(&q("2Gi")), Some(2 * (1 << 30) * 1000));
        assert_eq!(milli(&q("1e3")), Some(1_000_000));
        assert_eq!(milli(&q("5M")), Some(5_000_000_000));
        assert_eq!(milli(&q("fast")), None);
        assert_eq!(milli(&q("")), None);
    }

    #[test]
    fn byte_counts_are_whole_and_not_negative() {
        assert_eq!(bytes("20Gi"), Some(20 << 30));
        assert_eq!(bytes("500M"), Some(500_000_000));
        assert_eq!(bytes("0"), Some(0));
        assert_eq!(bytes("-1Ki"), None);
        assert_eq!(bytes("1500m"), None);
        assert_eq!(bytes("lots"), None);
    }
}
