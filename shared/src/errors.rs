//! Error text for people: one line holding an error and every cause under it, kept to
//! a length a terminal and a log line can hold.

/// The longest error line shown whole, in characters.
pub const MAX_LINE: usize = 1000;

/// `e: cause: cause…`, skipping causes whose text the line already holds.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}

/// `line` cut to [`MAX_LINE`] characters when longer: its start and its end (which
/// usually holds the cause) are kept, and the middle says how much was cut.
pub fn shorten(line: &str) -> String {
    shorten_to(line, MAX_LINE)
}

fn shorten_to(line: &str, max: usize) -> String {
    let total = line.chars().count();
    if total <= max {
        return line.to_string();
    }
    // The marker's own length is budgeted with a generous count of digits.
    let budget = max.saturating_sub(40).max(2);
    let (head, tail) = (budget * 2 / 3, budget - budget * 2 / 3);
    let cut = total - head - tail;
    let start: String = line.chars().take(head).collect();
    let end: String = line.chars().skip(total - tail).collect();
    format!("{start} [… {cut} characters cut …] {end}")
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn joins_causes_once() {
        let e = E(
            "connect",
            Some(Box::new(E("tls", Some(Box::new(E("tls", None)))))),
        );
        assert_eq!(super::chain(&e), "connect: tls");
    }

    #[test]
    fn long_lines_keep_their_start_and_end() {
        let line = format!(
            "read /{}/plan.toml: No such file or directory",
            "é".repeat(5000)
        );
        let short = super::shorten(&line);
        assert!(short.chars().count() <= super::MAX_LINE, "{}", short.len());
        assert!(short.starts_with("read /éé"), "{short}");
        assert!(
            short.ends_with("é/plan.toml: No such file or directory"),
            "{short}"
        );
        // What is kept plus what is said to be cut is the whole line.
        let (start, rest) = short.split_once(" [… ").unwrap();
        let (cut, end) = rest.split_once(" characters cut …] ").unwrap();
        assert!(line.starts_with(start) && line.ends_with(end));
        assert_eq!(
            start.chars().count() + cut.parse::<usize>().unwrap() + end.chars().count(),
            line.chars().count()
        );
        assert_eq!(super::shorten("short"), "short");
        let exact = "x".repeat(super::MAX_LINE);
        assert_eq!(super::shorten(&exact), exact);
    }
}
