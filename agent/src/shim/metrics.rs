//! `BRIDGE_METRIC name=value` lines: the one way a job reports a number to
//! bridge without any library (a sweep's `report` column). The shim scans
//! the main command's output for them as it copies it into the log and
//! writes the last value of each name to `metrics.json` when the job ends.
//!
//! A metric line is, after optional leading blanks, `BRIDGE_METRIC` and one
//! or more `name=value` pairs separated by blanks; a value that is not a
//! number is ignored. Output is read in chunks that do not follow lines, so
//! the unfinished last line of each stream is kept (up to [`MAX_LINE`]
//! bytes; a longer one cannot be a metric line worth its memory).

use std::collections::BTreeMap;

use memchr::memmem;

/// What starts a metric line.
pub const MARKER: &[u8] = b"BRIDGE_METRIC";
/// The longest unfinished line kept between two chunks.
pub const MAX_LINE: usize = 4096;

/// Metric values seen so far, and each stream's unfinished line.
#[derive(Debug, Default)]
pub struct MetricScan {
    values: BTreeMap<String, f64>,
    /// Per stream (stdout, stderr): the bytes of its last line so far, and
    /// whether that line outgrew [`MAX_LINE`] (the rest of it is skipped).
    partial: [(Vec<u8>, bool); 2],
}

impl MetricScan {
    /// The last value of each metric.
    pub fn values(&self) -> &BTreeMap<String, f64> {
        &self.values
    }

    /// Scans the next chunk of stream `stream` (0 stdout, 1 stderr).
    pub fn feed(&mut self, stream: usize, mut data: &[u8]) {
        let Some((partial, skipping)) = self.partial.get_mut(stream) else {
            return;
        };
        if !partial.is_empty() || *skipping {
            match memchr::memchr(b'\n', data) {
                Some(i) => {
                    if !*skipping {
                        partial.extend_from_slice(&data[..i]);
                        parse_line(partial, &mut self.values);
                    }
                    partial.clear();
                    *skipping = false;
                    data = &data[i + 1..];
                }
                None => {
                    if !*skipping && partial.len() + data.len() <= MAX_LINE {
                        partial.extend_from_slice(data);
                    } else {
                        partial.clear();
                        *skipping = true;
                    }
                    return;
                }
            }
        }
        let (complete, rest) = match memchr::memrchr(b'\n', data) {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (&data[..0], data),
        };
        for hit in memmem::find_iter(complete, MARKER) {
            let start = memchr::memrchr(b'\n', &complete[..hit]).map_or(0, |i| i + 1);
            let end = memchr::memchr(b'\n', &complete[hit..]).map_or(complete.len(), |i| hit + i);
            parse_line(&complete[start..end], &mut self.values);
        }
        if rest.len() <= MAX_LINE {
            partial.extend_from_slice(rest);
        } else {
            *skipping = true;
        }
    }
}

/// Adds the metrics of one line (without its newline) to `out`, if it is a
/// metric line.
pub fn parse_line(line: &[u8], out: &mut BTreeMap<String, f64>) {
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    let Some(rest) = line.trim_start().strip_prefix("BRIDGE_METRIC") else {
        return;
    };
    if !rest.starts_with([' ', '\t']) {
        return;
    }
    for pair in rest.split_whitespace() {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        if let Ok(v) = value.parse::<f64>()
            && v.is_finite()
        {
            out.insert(name.to_string(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[(usize, &str)]) -> BTreeMap<String, f64> {
        let mut s = MetricScan::default();
        for (stream, c) in chunks {
            s.feed(*stream, c.as_bytes());
        }
        s.values().clone()
    }

    #[test]
    fn metric_lines_anywhere_in_the_output_last_value_wins() {
        let v = scan(&[(
            0,
            "epoch 1\nBRIDGE_METRIC val_acc=0.5 loss=1.25\nnoise BRIDGE_METRIC x=1\n  BRIDGE_METRIC val_acc=0.75\n",
        )]);
        assert_eq!(v.get("val_acc"), Some(&0.75));
        assert_eq!(v.get("loss"), Some(&1.25));
        assert!(!v.contains_key("x"), "not at the start of its line");
    }

    #[test]
    fn lines_split_across_chunks_and_streams_are_followed() {
        let v = scan(&[
            (0, "a\nBRIDGE_MET"),
            (1, "BRIDGE_METRIC err=2\n"),
            (0, "RIC acc=0."),
            (0, "9"),
            (0, "1\nBRIDGE_METRIC last=3"),
        ]);
        assert_eq!(v.get("acc"), Some(&0.91));
        assert_eq!(v.get("err"), Some(&2.0));
        assert!(
            !v.contains_key("last"),
            "an unfinished line is not a metric yet"
        );
    }

    #[test]
    fn bad_values_and_overlong_lines_are_ignored() {
        let v = scan(&[(0, "BRIDGE_METRIC a=x b= =3 c=nan d=1e3 e\n")]);
        assert_eq!(
            v.into_iter().collect::<Vec<_>>(),
            [("d".to_string(), 1000.0)]
        );
        let long = "y".repeat(MAX_LINE + 10);
        let v = scan(&[
            (0, "BRIDGE_METRIC z=1 "),
            (0, &long),
            (0, "\nBRIDGE_METRIC after=2\n"),
        ]);
        assert!(!v.contains_key("z"), "the overlong line was dropped");
        assert_eq!(v.get("after"), Some(&2.0));
        assert!(scan(&[(0, "BRIDGE_METRICS x=1\n")]).is_empty());
    }
}
