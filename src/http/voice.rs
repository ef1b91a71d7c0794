//! `POST /twilio/voice` and `/twilio/voice/gather`: the voice menu over TwiML.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;

use super::{xml, AppState, TwilioForm, WebhookError};
use crate::engine::Input;
use crate::flows::IvrAction;
use crate::ivr::{self, Turn};
use crate::twiml::{self, Asked};

/// A call comes in: the start menu.
pub async fn call(
    State(state): State<Arc<AppState>>,
    form: TwilioForm,
) -> Result<Response, WebhookError> {
    let flows = state.engine.flows();
    if hidden(&form) {
        return Ok(xml(twiml::voice(
            &ivr::hidden_caller(&flows),
            Asked::OnCall,
            false,
        )));
    }
    form.phone("From")?;
    Ok(xml(twiml::voice(
        &ivr::call_starts(&flows),
        Asked::OnCall,
        attested(&form),
    )))
}

/// Stand-ins Twilio and carriers put in `From` for a withheld number: words, and keypad
/// spellings of ANONYMOUS, UNAVAILABLE, RESTRICTED and BLOCKED that look like real numbers.
const WITHHELD: [&str; 10] = [
    "anonymous",
    "restricted",
    "unavailable",
    "unknown",
    "private",
    "blocked",
    "266696687",
    "86282452253",
    "7378742833",
    "2562533",
];

/// A call whose `From` is a withheld-number stand-in or no phone number at all. (A missing
/// `From` is a malformed webhook, answered 400 like any other.)
fn hidden(form: &TwilioForm) -> bool {
    let Some(from) = form.get("From") else {
        return false;
    };
    let bare = from.trim().trim_start_matches('+').to_ascii_lowercase();
    WITHHELD.contains(&bare.as_str()) || form.phone("From").is_err()
}

/// A call whose caller ID the originating carrier fully attested (STIR/SHAKEN level A):
/// Twilio then sends `StirVerstat=TN-Validation-Passed-A` with the incoming call's webhook
/// (and perhaps with later ones: the menu's URL carries it on in any case). The value is
/// covered by the request's signature, like every other parameter.
fn attested(form: &TwilioForm) -> bool {
    form.get("StirVerstat")
        .is_some_and(|v| v.trim() == "TN-Validation-Passed-A")
}

#[derive(Deserialize)]
pub struct Where {
    menu: Option<String>,
    attempt: Option<u8>,
    /// 1: the call's caller ID was attested when it came in (see [`attested`]).
    attested: Option<u8>,
}

/// The caller pressed a key (or stayed silent) in a menu.
pub async fn gather(
    State(state): State<Arc<AppState>>,
    at: Result<Query<Where>, QueryRejection>,
    form: TwilioForm,
) -> Result<Response, WebhookError> {
    // Read only now that the form (and so the signature) has passed: an unsigned request
    // is refused as unsigned, whatever its query string.
    let Query(at) = at.map_err(|e| WebhookError::BadRequest(e.body_text()))?;
    let flows = state.engine.flows();
    if hidden(&form) {
        return Ok(xml(twiml::voice(
            &ivr::hidden_caller(&flows),
            Asked::InMenu,
            false,
        )));
    }
    let phone = form.phone("From")?;
    // Attested when the call came in (carried in the menu's URL), or says so now.
    let caller_attested = at.attested == Some(1) || attested(&form);
    let menu = at.menu.unwrap_or_else(|| flows.ivr.start.clone());
    let digits = form.get("Digits").filter(|d| !d.trim().is_empty());
    let turn = match ivr::key_pressed(&flows, &menu, at.attempt.unwrap_or(0), digits) {
        Turn::Act(action) => {
            let event = ivr::action_event(&action);
            // read_code speaks the code instead of texting it, to a caller it may trust
            let spoken = action == IvrAction::ReadCode && flows.ivr.reads_code_to(caller_attested);
            let applied = state
                .engine
                .apply(Input {
                    phone: &phone,
                    event,
                    inbound_sid: None,
                    fired: None,
                    inline_codes: spoken,
                    to: super::our_number(&state, &form).as_ref(),
                })
                .await?;
            tracing::info!(phone = %phone.masked(), ?action, outcome = super::outcome_label(applied.outcome), "voice menu action");
            let code = applied.codes.first().map(|(_, c)| c.as_str());
            // For the texts shared with SMS, which may name the caller's fields.
            let caller = state
                .engine
                .store
                .subscriber(&phone)
                .unwrap_or_else(|e| {
                    tracing::warn!(phone = %phone.masked(), "voice menu: speaking without the caller's fields: {e:#}");
                    None
                });
            Turn::End(ivr::after_action(
                &flows,
                &action,
                applied.outcome,
                code,
                caller.as_ref(),
            ))
        }
        other => other,
    };
    Ok(xml(twiml::voice(&turn, Asked::InMenu, caller_attested)))
}
