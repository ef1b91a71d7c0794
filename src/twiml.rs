//! TwiML answers, escaped by quick-xml.

use quick_xml::escape::escape;

use crate::ivr::{Speech, Turn};

const HEADER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// Text as XML character data: escaped by quick-xml, and without the characters XML 1.0 does
/// not allow at all (C0 controls other than tab, LF and CR; U+FFFE, U+FFFF), which no escape
/// can carry and which would make Twilio reject the whole answer. A form field may hold one
/// (GSM 03.38 has a form feed) and a reply may quote it.
fn text(t: &str) -> std::borrow::Cow<'_, str> {
    let allowed = |c: char| matches!(c, '\t' | '\n' | '\r' | ' '..='\u{fffd}' | '\u{10000}'..);
    if t.chars().all(allowed) {
        escape(t)
    } else {
        escape(t.chars().filter(|c| allowed(*c)).collect::<String>())
            .into_owned()
            .into()
    }
}

/// `<Response>` with one `<Message>` per text, or an empty `<Response/>`.
pub fn messages(texts: &[String]) -> String {
    if texts.is_empty() {
        return format!("{HEADER}<Response/>");
    }
    let mut out = format!("{HEADER}<Response>");
    for t in texts {
        out.push_str("<Message>");
        out.push_str(&text(t));
        out.push_str("</Message>");
    }
    out.push_str("</Response>");
    out
}

fn speech(out: &mut String, items: &[Speech]) {
    for s in items {
        match s {
            Speech::Say(words) => {
                out.push_str("<Say>");
                out.push_str(&text(words));
                out.push_str("</Say>");
            }
            Speech::Pause(secs) => out.push_str(&format!(r#"<Pause length="{secs}"/>"#)),
        }
    }
}

/// Which webhook a voice turn answers. The menu's next URL is relative to it (Twilio resolves
/// it against the URL it called), so a `public_url` with a path, behind a proxy that strips
/// it, keeps the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asked {
    /// `/twilio/voice`
    OnCall,
    /// `/twilio/voice/gather`
    InMenu,
}

/// A voice turn: speak inside a one-key `<Gather>` (silence falls through to a redirect
/// that re-prompts), or speak and hang up. `attested`: the call's caller ID was attested
/// when it came in, which the menu's next URL carries on (Twilio signs that URL).
pub fn voice(turn: &Turn, asked: Asked, attested: bool) -> String {
    let mut out = format!("{HEADER}<Response>");
    match turn {
        Turn::Ask { say, menu, attempt } => {
            // Keys in alphabetical order: Twilio has been seen to sort an action URL's query
            // before calling it while signing the URL as written, so only a sorted query
            // is signed as it arrives.
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("attempt", &attempt.to_string());
            if attested {
                query.append_pair("attested", "1");
            }
            let query = query.append_pair("menu", menu).finish();
            let next = match asked {
                Asked::OnCall => "voice/gather",
                Asked::InMenu => "gather",
            };
            let action = escape(format!("{next}?{query}")).into_owned();
            out.push_str(&format!(
                r#"<Gather input="dtmf" numDigits="1" finishOnKey="" timeout="5" action="{action}" method="POST">"#
            ));
            speech(&mut out, say);
            out.push_str("</Gather>");
            out.push_str(&format!(r#"<Redirect method="POST">{action}</Redirect>"#));
        }
        Turn::End(say) => {
            speech(&mut out, say);
            out.push_str("<Hangup/>");
        }
        Turn::Act(_) => out.push_str("<Hangup/>"),
    }
    out.push_str("</Response>");
    out
}

/// Inline TwiML for an outgoing call that reads `text` twice.
pub fn read_twice(text: &str) -> String {
    let mut out = String::from("<Response>");
    speech(
        &mut out,
        &[
            Speech::Say(text.to_string()),
            Speech::Pause(1),
            Speech::Say(text.to_string()),
        ],
    );
    out.push_str("</Response>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_text_is_escaped() {
        let x = messages(&["Tom & Jerry <3 \"quotes\"".to_string()]);
        assert!(
            x.contains("<Message>Tom &amp; Jerry &lt;3 &quot;quotes&quot;</Message>"),
            "{x}"
        );
    }

    #[test]
    fn characters_xml_cannot_carry_are_left_out_and_the_rest_kept() {
        let x = messages(&["Ann\u{c}e\u{0} <\u{fffe}\u{ffff}é\t😀".to_string()]);
        assert!(x.contains("<Message>Anne &lt;é\t😀</Message>"), "{x}");
        let spoken = voice(
            &Turn::End(vec![Speech::Say("a\u{1b}b".into())]),
            Asked::InMenu,
            false,
        );
        assert!(spoken.contains("<Say>ab</Say>"), "{spoken}");
    }

    #[test]
    fn a_menus_next_url_has_its_query_keys_in_alphabetical_order() {
        let x = voice(
            &Turn::Ask {
                say: Vec::new(),
                menu: "main".into(),
                attempt: 2,
            },
            Asked::OnCall,
            false,
        );
        assert!(
            x.contains(r#"action="voice/gather?attempt=2&amp;menu=main""#),
            "{x}"
        );
        let x = voice(
            &Turn::Ask {
                say: Vec::new(),
                menu: "main".into(),
                attempt: 0,
            },
            Asked::InMenu,
            true,
        );
        assert!(
            x.contains(r#"action="gather?attempt=0&amp;attested=1&amp;menu=main""#),
            "{x}"
        );
    }

    #[test]
    fn no_replies_is_an_empty_response() {
        assert!(messages(&[]).ends_with("<Response/>"));
    }
}
