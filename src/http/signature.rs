//! Twilio request signatures: base64(HMAC-SHA1(auth token, URL + sorted key/value pairs)).

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

fn mac(token: &str, url: &str, params: &[(String, String)]) -> Option<HmacSha1> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = HmacSha1::new_from_slice(token.as_bytes()).ok()?;
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    Some(mac)
}

/// The signature Twilio would send for this request.
pub fn sign(token: &str, url: &str, params: &[(String, String)]) -> String {
    mac(token, url, params)
        .map(|m| base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes()))
        .unwrap_or_default()
}

/// True when `signature` is valid for `url` (also tried with and without the default port,
/// as Twilio has signed both, and without any other port it has) in constant time.
pub fn verify(token: &str, url: &str, params: &[(String, String)], signature: &str) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    url_variants(url)
        .iter()
        .any(|u| mac(token, u, params).is_some_and(|m| m.verify_slice(&given).is_ok()))
}

/// Whether a bearer token a request gave is the configured one, in constant time and without
/// telling its length: both are MACed with the configured token as the key, and the MACs,
/// always 20 bytes, are compared.
pub fn same_token(given: &str, token: &str) -> bool {
    let Ok(key) = HmacSha1::new_from_slice(token.as_bytes()) else {
        return false;
    };
    let expected = key.clone().chain_update(token).finalize().into_bytes();
    key.chain_update(given).verify_slice(&expected).is_ok()
}

fn url_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_string()];
    let Ok(parsed) = url::Url::parse(url) else {
        return out;
    };
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return out;
    };
    // The url crate drops a default port when it prints a URL: that is the "without" form.
    let without = parsed.to_string();
    let prefix = format!("{}://{host}", parsed.scheme());
    if let (None, Some(rest)) = (parsed.port(), without.strip_prefix(&prefix)) {
        out.push(format!("{prefix}:{port}{rest}"));
    }
    out.push(without);
    // Any other port too: over HTTPS Twilio drops it before signing ("Twilio will drop the
    // username, password and port (if any)"), and its SDKs try the URL without it.
    let mut portless = parsed;
    if portless.port().is_some() && portless.set_port(None).is_ok() {
        out.push(portless.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn twilios_published_test_vector_verifies() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            sign("12345", url, &vector()),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert!(verify(
            "12345",
            url,
            &vector(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    #[test]
    fn a_wrong_token_param_or_url_fails() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let sig = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
        assert!(!verify("54321", url, &vector(), sig));
        let mut params = vector();
        params[2].1 = "9999".into();
        assert!(!verify("12345", url, &params, sig));
        assert!(!verify(
            "12345",
            "https://evil.com/myapp.php?foo=1&bar=2",
            &vector(),
            sig
        ));
        assert!(!verify("12345", url, &vector(), "not base64!"));
    }

    #[test]
    fn a_signature_made_with_or_without_the_default_port_is_accepted() {
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        let sig = sign("12345", with_port, &vector());
        assert!(verify(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=2",
            &vector(),
            &sig
        ));
        let sig = sign(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=2",
            &vector(),
        );
        assert!(verify("12345", with_port, &vector(), &sig));
    }

    #[test]
    fn a_signature_made_without_another_port_is_accepted_as_twilio_signs_over_https() {
        let url = "https://example.ngrok.app:8443/twilio/sms";
        let sig = sign("12345", "https://example.ngrok.app/twilio/sms", &vector());
        assert!(verify("12345", url, &vector(), &sig));
        assert!(verify(
            "12345",
            url,
            &vector(),
            &sign("12345", url, &vector())
        ));
        let elsewhere = sign(
            "12345",
            "https://example.ngrok.app:9443/twilio/sms",
            &vector(),
        );
        assert!(!verify("12345", url, &vector(), &elsewhere));
    }

    #[test]
    fn the_shipped_inbound_example_verifies() {
        let body = "ToCountry=US&ToState=CA&SmsMessageSid=SM9156d249c6d45240072da35b9274f334&NumMedia=0&ToCity=&FromZip=94105&SmsSid=SM9156d249c6d45240072da35b9274f334&FromState=CA&SmsStatus=received&FromCity=SAN+FRANCISCO&Body=JOIN&FromCountry=US&To=%2B15017122661&ToZip=&NumSegments=1&MessageSid=SM9156d249c6d45240072da35b9274f334&AccountSid=AC00000000000000000000000000000000&From=%2B15550001111&ApiVersion=2010-04-01";
        let params: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        assert!(verify(
            "secrettoken",
            "https://example.ngrok.app/twilio/sms",
            &params,
            "m+ydFfHlycJ9mNu+dGTFBE8Juxk="
        ));
    }

    #[test]
    fn a_bearer_token_matches_only_itself() {
        assert!(same_token("s3cret", "s3cret"));
        for wrong in ["", "s3cre", "s3cret!", "S3CRET", "x3cret"] {
            assert!(!same_token(wrong, "s3cret"), "{wrong:?}");
        }
    }
}
