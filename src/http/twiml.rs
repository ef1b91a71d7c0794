//! TwiML answers, escaped by quick-xml.

use quick_xml::escape::escape;

const HEADER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// `<Response>` with one `<Message>` per text, or an empty `<Response/>`.
pub fn messages(texts: &[String]) -> String {
    if texts.is_empty() {
        return format!("{HEADER}<Response/>");
    }
    let mut out = format!("{HEADER}<Response>");
    for t in texts {
        out.push_str("<Message>");
        out.push_str(&escape(t.as_str()));
        out.push_str("</Message>");
    }
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
    fn no_replies_is_an_empty_response() {
        assert!(messages(&[]).ends_with("<Response/>"));
    }
}
