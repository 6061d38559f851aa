use super::*;

fn event(offset_s: f64, text: &str) -> Value {
    json!({"offset_s": offset_s, "text": text})
}

fn progress(state: &str) -> (String, String) {
    (
        format!("d-000001 web 2: {state} step 1/2 traffic 10%"),
        " | last interval: pass (10 req new, 90 old)".to_string(),
    )
}

#[test]
fn plain_lines_say_what_changed_and_a_heartbeat_when_nothing_does() {
    let mut log = PlainLog::default();
    let s = Duration::from_secs;
    let first = log.lines(
        &[event(0.0, "submitted")],
        progress("preparing"),
        Some(10.0),
        s(0),
    );
    assert_eq!(
        first,
        [
            "  +0.0s submitted",
            "d-000001 web 2: preparing step 1/2 traffic 10% | last interval: pass (10 req new, 90 old) | ETA 10.0s"
        ]
    );
    // Four polls a second for 29 s: the ETA and the figures move, nothing else does.
    for tick in 1..(29 * 4) {
        let at = Duration::from_millis(tick * 250);
        let mut p = progress("preparing");
        p.1 = format!(" | last interval: pass ({tick} req new, 90 old)");
        let eta = 10.0 - at.as_secs_f64();
        assert!(
            log.lines(&[event(0.0, "submitted")], p, Some(eta), at)
                .is_empty(),
            "at {at:?}"
        );
    }
    // 30 s without a line: the progress line again, with the current figures.
    let beat = log.lines(
        &[event(0.0, "submitted")],
        progress("preparing"),
        None,
        s(30),
    );
    assert_eq!(beat.len(), 1);
    assert!(beat[0].starts_with("d-000001 web 2: preparing"), "{beat:?}");
    // A new event is printed at once; the unchanged progress line is not.
    let events = [event(0.0, "submitted"), event(31.0, "web-1: ready")];
    assert_eq!(
        log.lines(&events, progress("preparing"), None, s(31)),
        ["  +31.0s web-1: ready"]
    );
    // An event resets the heartbeat: nothing at 60 s, a line at 61 s.
    assert!(
        log.lines(&events, progress("preparing"), None, s(60))
            .is_empty()
    );
    assert_eq!(
        log.lines(&events, progress("preparing"), None, s(61)).len(),
        1
    );
    // A change of state is printed at once.
    let changed = log.lines(
        &events,
        progress("progressing"),
        None,
        Duration::from_millis(61_250),
    );
    assert_eq!(changed.len(), 1);
    assert!(changed[0].contains(": progressing step"), "{changed:?}");
}

#[test]
fn tables_fit_their_widest_cells() {
    let rows = [
        ["ID", "STATE", "DURATION", "REASON"].map(String::from),
        ["d-000012", "succeeded (rollback)", "1.2s", ""].map(String::from),
        ["d-000011", "rolled_back", "1m05s", "host web-2: disk full"].map(String::from),
    ];
    let lines = table_lines(&rows, &[2]);
    assert_eq!(
        lines,
        [
            "ID        STATE                 DURATION  REASON",
            "d-000012  succeeded (rollback)      1.2s",
            "d-000011  rolled_back              1m05s  host web-2: disk full",
        ]
    );
}
