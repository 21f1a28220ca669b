//! `ordinal status --watch`: one line per interval from a daemon's status, with rates worked out
//! from the difference between two answers.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The number after `"key":` in `json`, searched from the first `"scope":` when a scope is
/// given (the status answers are flat apart from a few small objects).
fn number(json: &str, scope: Option<&str>, key: &str) -> Option<f64> {
    let from = match scope {
        Some(scope) => json.find(&format!("\"{scope}\":"))?,
        None => 0,
    };
    let pattern = format!("\"{key}\":");
    let at = from + json[from..].find(&pattern)? + pattern.len();
    let text: String = json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
        .collect();
    text.parse().ok()
}

fn flag(json: &str, key: &str) -> Option<bool> {
    let pattern = format!("\"{key}\":");
    let at = json.find(&pattern)? + pattern.len();
    Some(json[at..].starts_with("true"))
}

fn text<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":\"");
    let at = json.find(&pattern)? + pattern.len();
    json[at..].split('"').next()
}

/// A counter's rate per second between two answers.
fn rate(now: &str, before: Option<&(String, Instant)>, key: &str, elapsed: Duration) -> String {
    match (
        number(now, None, key),
        before.and_then(|(json, _)| number(json, None, key)),
    ) {
        (Some(now), Some(before)) if elapsed > Duration::ZERO => {
            format!("{:.0}", (now - before).max(0.0) / elapsed.as_secs_f64())
        }
        _ => "-".into(),
    }
}

fn mib(bytes: Option<f64>) -> String {
    bytes.map_or_else(
        || "-".into(),
        |bytes| format!("{:.1}", bytes / f64::from(1 << 20)),
    )
}

fn shown(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |value| format!("{value:.0}"))
}

/// One line for `json`, given the previous answer; the header once per role.
fn line(json: &str, before: Option<&(String, Instant)>, elapsed: Duration) -> (String, String) {
    match text(json, "role") {
        Some("primary") => {
            let ring_fill = match (
                number(json, None, "ring_used_bytes"),
                number(json, None, "ring_bytes"),
            ) {
                (Some(used), Some(size)) if size > 0.0 => format!("{:.0}%", 100.0 * used / size),
                _ => "-".into(),
            };
            let state = match text(json, "stopped") {
                Some(stop) if !stop.is_empty() => format!("STOPPED {stop}"),
                _ if flag(json, "dr_link_up") == Some(false) => {
                    if flag(json, "degraded") == Some(true) {
                        "DR link down, degraded".into()
                    } else {
                        "DR link down".into()
                    }
                }
                // Degraded with the link up: the DR's answer is overdue (--degrade-after-ms).
                _ if flag(json, "degraded") == Some(true) => "degraded, DR late".into(),
                _ if flag(json, "aux_connected") == Some(false) => "aux down".into(),
                _ => "ok".into(),
            };
            (
                format!(
                    "{:>10} {:>9} {:>9} {:>9} {:>6} {:>10} {:>10} {:>10}  state",
                    "acked/s",
                    "last seq",
                    "lag ops",
                    "lag MiB",
                    "ring",
                    "ack p50us",
                    "ack p99us",
                    "order p50us"
                ),
                format!(
                    "{:>10} {:>9} {:>9} {:>9} {:>6} {:>10} {:>10} {:>10}  {state}",
                    rate(json, before, "acked", elapsed),
                    shown(number(json, None, "last_acked_seq")),
                    shown(number(json, None, "lag_ops")),
                    mib(number(json, None, "lag_bytes")),
                    ring_fill,
                    shown(number(json, Some("ack_latency_last_second_us"), "p50")),
                    shown(number(json, Some("ack_latency_last_second_us"), "p99")),
                    shown(number(json, Some("order_round_trip_us"), "p50")),
                ),
            )
        }
        Some("dr") => (
            format!(
                "{:>10} {:>10} {:>10} {:>12} {:>9}  state",
                "applied/s", "held", "landed", "applied thru", "refused"
            ),
            format!(
                "{:>10} {:>10} {:>10} {:>12} {:>9}  {} (primary {})",
                rate(json, before, "applied", elapsed),
                shown(number(json, None, "held_through")),
                shown(number(json, None, "landed_through")),
                shown(number(json, None, "applied_through")),
                shown(number(json, None, "refused")),
                text(json, "state").unwrap_or("-"),
                if flag(json, "primary_connected") == Some(true) {
                    "connected"
                } else {
                    "not connected"
                },
            ),
        ),
        Some("aux") => (
            format!(
                "{:>12} {:>8} {:>8}  primary / DR",
                "heartbeat/s", "epoch", "fenced"
            ),
            format!(
                "{:>12} {:>8} {:>8}  {} / {}",
                rate(json, before, "heartbeat", elapsed),
                shown(number(json, None, "epoch")),
                flag(json, "fenced").map_or("-", |fenced| if fenced { "yes" } else { "no" }),
                shown(number(json, None, "primary_connections")),
                if flag(json, "dr_connected") == Some(true) {
                    "connected"
                } else {
                    "not connected"
                },
            ),
        ),
        _ => ("status".into(), json.to_string()),
    }
}

/// Prints a line per `interval` until interrupted (or `count` lines). A daemon that does not
/// answer gets a line saying so and is asked again: it may be restarting.
pub fn run(
    node: SocketAddr,
    psk: &[u8],
    interval: Duration,
    count: Option<u64>,
) -> Result<ExitCode, String> {
    let mut before: Option<(String, Instant)> = None;
    let mut header_shown = None::<String>;
    let mut lines = 0u64;
    // A line every `interval` however long a request takes, so that the samples read as a
    // time series (tools/wan.sh reads the lag sampled every 200 ms that way); a line more
    // than an interval late moves the ones after it rather than bunching them.
    let mut due = Instant::now();
    while count.is_none_or(|count| lines < count) {
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let now = Instant::now();
        due = if now > due + interval {
            now + interval
        } else {
            due + interval
        };
        lines += 1;
        let asked = Instant::now();
        match ordinal_runtime::admin::request(node, psk, "status", Duration::from_secs(5)) {
            Ok(json) => {
                let elapsed = before
                    .as_ref()
                    .map_or(Duration::ZERO, |(_, at)| asked - *at);
                let (header, row) = line(&json, before.as_ref(), elapsed);
                if header_shown.as_deref() != Some(header.as_str()) {
                    println!("{header}");
                    header_shown = Some(header);
                }
                println!("{row}");
                before = Some((json, asked));
            }
            Err(error) => {
                println!("{node} does not answer: {error}");
                before = None;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str = r#"{"role":"primary","epoch":1,"mode":"order-sync","stopped":"","last_seq":2000,"last_acked_seq":1990,"lag_ops":10,"lag_bytes":2097152,"ring_used_bytes":16777216,"ring_bytes":67108864,"dr_link_up":true,"aux_connected":true,"acked":1990,"order_round_trip_us":{"count":5,"p50":120,"p99":300},"ack_latency_last_second_us":{"count":900,"p50":180,"p99":450}}"#;

    #[test]
    fn a_primary_line_has_its_rate_lag_ring_fill_and_latencies() {
        let before = PRIMARY.replace("\"acked\":1990", "\"acked\":990");
        let (header, row) = line(
            PRIMARY,
            Some(&(before, Instant::now())),
            Duration::from_secs(2),
        );
        assert!(
            header.contains("acked/s") && header.contains("ack p99us"),
            "{header}"
        );
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            fields,
            ["500", "1990", "10", "2.0", "25%", "180", "450", "120", "ok"]
        );
    }

    #[test]
    fn a_stopped_primary_and_a_first_answer_say_so() {
        let stopped = PRIMARY.replace("\"stopped\":\"\"", "\"stopped\":\"FencedByAux\"");
        let (_, row) = line(&stopped, None, Duration::ZERO);
        assert!(
            row.starts_with("         -"),
            "no rate without a previous answer: {row}"
        );
        assert!(row.ends_with("STOPPED FencedByAux"), "{row}");
    }

    #[test]
    fn a_degraded_primary_says_whether_its_dr_link_is_down_or_its_dr_late() {
        let late = PRIMARY.replace(
            "\"dr_link_up\":true",
            "\"dr_link_up\":true,\"degraded\":true",
        );
        assert!(line(&late, None, Duration::ZERO)
            .1
            .ends_with("degraded, DR late"));
        let down = late.replace("\"dr_link_up\":true", "\"dr_link_up\":false");
        assert!(line(&down, None, Duration::ZERO)
            .1
            .ends_with("DR link down, degraded"));
        let blocked = PRIMARY.replace("\"dr_link_up\":true", "\"dr_link_up\":false");
        assert!(line(&blocked, None, Duration::ZERO)
            .1
            .ends_with("DR link down"));
    }

    #[test]
    fn scoped_numbers_come_from_their_object() {
        assert_eq!(
            number(PRIMARY, Some("order_round_trip_us"), "p99"),
            Some(300.0)
        );
        assert_eq!(
            number(PRIMARY, Some("ack_latency_last_second_us"), "p99"),
            Some(450.0)
        );
        assert_eq!(number(PRIMARY, None, "missing"), None);
    }
}
