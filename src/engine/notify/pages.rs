//! Fitting text into Telegram messages. Telegram refuses a message over 4096 characters
//! as it counts them: UTF-16 code units of the text after entity parsing (tags count
//! nothing, `&lt;` counts one). Texts are measured that way, conservatively, and split or
//! cut at line ends; the tags open at a cut are closed there and reopened on the next
//! page, so every part is valid HTML on its own.

use super::MAX_TEXT;

/// The most a message we send may count: a margin below Telegram's limit, so an
/// unforeseen difference in counting cannot cost a message.
pub const LIMIT: usize = MAX_TEXT - 96;

enum Token<'a> {
    /// `<b>`, `<a href="…">`: the whole tag and its name.
    Open(&'a str, &'a str),
    /// `</b>`: the name.
    Close(&'a str),
    /// One character or one entity, and what Telegram counts for it.
    Text(&'a str, usize),
}

/// The tokens of Telegram HTML. Anything malformed counts as plain text (Telegram then
/// refuses the message anyway; the count stays an upper bound).
fn tokens(html: &str) -> impl Iterator<Item = Token<'_>> {
    let mut rest = html;
    std::iter::from_fn(move || {
        let c = rest.chars().next()?;
        let (token, len) = match c {
            '<' => match rest.find('>') {
                Some(end) => {
                    let inner = &rest[1..end];
                    let token = match inner.strip_prefix('/') {
                        Some(name) => Token::Close(name.trim()),
                        None => Token::Open(
                            &rest[..=end],
                            inner.split_whitespace().next().unwrap_or(""),
                        ),
                    };
                    (token, end + 1)
                }
                None => (Token::Text(&rest[..1], 1), 1),
            },
            '&' => match rest
                .find(';')
                .and_then(|end| Some((end, entity_units(&rest[1..end])?)))
            {
                Some((end, units)) => (Token::Text(&rest[..=end], units), end + 1),
                None => (Token::Text(&rest[..1], 1), 1),
            },
            c => (
                Token::Text(&rest[..c.len_utf8()], c.len_utf16()),
                c.len_utf8(),
            ),
        };
        rest = &rest[len..];
        Some(token)
    })
}

/// What an entity `&name;` counts, if Telegram takes it for one.
fn entity_units(name: &str) -> Option<usize> {
    let number =
        |digits: &str, radix| !digits.is_empty() && u32::from_str_radix(digits, radix).is_ok();
    match name {
        "lt" | "gt" | "amp" | "quot" => Some(1),
        // It may stand for a character outside the BMP: two units.
        _ if name.strip_prefix("#x").is_some_and(|d| number(d, 16)) => Some(2),
        _ if name.strip_prefix('#').is_some_and(|d| number(d, 10)) => Some(2),
        _ => None,
    }
}

/// What Telegram counts of this HTML text (an upper bound).
pub fn telegram_len(html: &str) -> usize {
    tokens(html)
        .map(|t| match t {
            Token::Text(_, units) => units,
            _ => 0,
        })
        .sum()
}

/// An open tag: the whole opening tag and its name.
type Tag<'a> = (&'a str, &'a str);

/// Split HTML text into parts of at most `limit` (as Telegram counts), at line ends
/// where a line fits, else anywhere between characters and entities.
pub fn pages(html: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(1);
    let mut out = Vec::new();
    let mut page = String::new();
    let mut count = 0;
    let mut open: Vec<Tag> = Vec::new();
    // The last line end on this page: byte offset after it, count so far, open tags.
    let mut line_end: Option<(usize, usize, Vec<Tag>)> = None;
    for token in tokens(html) {
        match token {
            Token::Open(tag, name) => {
                page.push_str(tag);
                open.push((tag, name));
            }
            Token::Close(name) => {
                page.push_str("</");
                page.push_str(name);
                page.push('>');
                if let Some(i) = open.iter().rposition(|(_, n)| *n == name) {
                    open.remove(i);
                }
            }
            Token::Text(text, units) => {
                if count + units > limit {
                    let (rest, rest_count) = match line_end.take() {
                        // Cut at the last line end: the rest of the line starts the next page.
                        Some((at, counted, tags)) if counted > 0 => {
                            let rest = page.split_off(at);
                            out.push(close(&page, &tags));
                            (reopen(&tags) + &rest, count - counted)
                        }
                        // One line longer than a page: cut it here.
                        _ => {
                            out.push(close(&page, &open));
                            (reopen(&open), 0)
                        }
                    };
                    page = rest;
                    count = rest_count;
                }
                page.push_str(text);
                count += units;
                if text == "\n" {
                    line_end = Some((page.len(), count, open.clone()));
                }
            }
        }
    }
    out.push(page.trim_end().to_string());
    // Telegram refuses a message with nothing to show.
    out.retain(|p| tokens(p).any(|t| matches!(t, Token::Text(text, _) if !text.trim().is_empty())));
    out
}

/// `page` without its trailing line end, with `open` tags closed.
fn close(page: &str, open: &[Tag]) -> String {
    let mut out = page.trim_end().to_string();
    for (_, name) in open.iter().rev() {
        out.push_str("</");
        out.push_str(name);
        out.push('>');
    }
    out
}

fn reopen(open: &[Tag]) -> String {
    open.iter().map(|(tag, _)| *tag).collect()
}

/// One message from `html`: as it is when it fits, else its first part and `note`.
pub fn fit(html: &str, note: &str) -> String {
    if telegram_len(html) <= LIMIT {
        return html.to_string();
    }
    let room = LIMIT.saturating_sub(telegram_len(note) + 1);
    let first = pages(html, room).into_iter().next().unwrap_or_default();
    format!("{first}\n{note}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_like_telegram() {
        assert_eq!(telegram_len("<b>a</b> &lt;&amp;&quot;"), 5);
        assert_eq!(telegram_len("🙂"), 2, "outside the BMP: two UTF-16 units");
        assert_eq!(telegram_len("é"), 1);
        assert_eq!(telegram_len("&#128578;"), 2);
        assert_eq!(telegram_len("a < b"), 5, "a stray < counts as text");
        assert_eq!(telegram_len("&nbsp;"), 6, "not an entity Telegram knows");
    }

    #[test]
    fn splits_at_line_ends_and_keeps_every_line() {
        let lines: Vec<String> = (0..300)
            .map(|i| format!("• <code>{i}</code> user {i} 🙂"))
            .collect();
        let text = lines.join("\n");
        let parts = pages(&text, 1000);
        assert!(parts.len() > 1);
        for p in &parts {
            assert!(telegram_len(p) <= 1000, "{}", telegram_len(p));
            assert!(!p.starts_with('\n') && !p.ends_with('\n'));
        }
        assert_eq!(parts.join("\n"), text, "nothing lost, nothing added");
    }

    #[test]
    fn a_cut_inside_a_tag_closes_and_reopens_it() {
        let text = format!("<pre>{}</pre>", "line of output\n".repeat(200));
        let parts = pages(&text, 500);
        assert!(parts.len() > 1);
        for p in &parts {
            assert!(p.starts_with("<pre>") && p.ends_with("</pre>"), "{p}");
            assert!(telegram_len(p) <= 500);
        }
        // One endless line of emoji and entities: cut between them, never inside.
        let long = format!("<b>{}</b>", "🙂&amp;".repeat(3000));
        for p in pages(&long, 999) {
            assert!(telegram_len(&p) <= 999);
            assert!(p.starts_with("<b>") && p.ends_with("</b>"), "{p}");
            assert!(!p.contains("&amp</b>") && !p.contains("<b>;"));
        }
    }

    #[test]
    fn fit_cuts_with_a_note_only_when_needed() {
        assert_eq!(fit("short", "(cut)"), "short");
        let long = "🙂".repeat(3000); // 3000 characters, 6000 UTF-16 units
        let fitted = fit(&long, "… (cut)");
        assert!(telegram_len(&fitted) <= LIMIT && fitted.ends_with("… (cut)"));
    }
}
