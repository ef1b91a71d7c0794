//! The voice menu as pure logic: which prompt to speak, which key leads where. The HTTP layer
//! renders it as TwiML; `smsflow simulate` prints it.

use crate::flows::{Flows, IvrAction, Template};
use crate::machine::{placeholder, Event, Outcome, Subscriber};

/// Something said on the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Speech {
    Say(String),
    Pause(u8),
}

/// What the call does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Speak, then wait for one key in `menu` (`attempt` counts re-prompts).
    Ask {
        say: Vec<Speech>,
        menu: String,
        attempt: u8,
    },
    /// Run an action that needs the engine; [`after_action`] says what to speak.
    Act(IvrAction),
    /// Speak, then hang up.
    End(Vec<Speech>),
}

/// A call from a withheld number (Twilio sends `anonymous`, `restricted`, …): every action
/// works by number, so say why and hang up.
pub fn hidden_caller(flows: &Flows) -> Turn {
    Turn::End(vec![Speech::Say(
        flows.render_plain(&flows.ivr.hidden_caller),
    )])
}

/// A call comes in: the start menu.
pub fn call_starts(flows: &Flows) -> Turn {
    match flows.ivr.menus.get(&flows.ivr.start) {
        Some(menu) => Turn::Ask {
            say: vec![Speech::Say(flows.render_plain(&menu.say))],
            menu: flows.ivr.start.clone(),
            attempt: 0,
        },
        None => Turn::End(vec![Speech::Say(flows.render_plain(&flows.ivr.goodbye))]),
    }
}

/// The caller pressed `digits` (or nothing) in `menu`.
pub fn key_pressed(flows: &Flows, menu: &str, attempt: u8, digits: Option<&str>) -> Turn {
    let ivr = &flows.ivr;
    let Some(current) = ivr.menus.get(menu) else {
        // A menu that vanished in a reload: start over.
        return call_starts(flows);
    };
    let goodbye = || Speech::Say(flows.render_plain(&ivr.goodbye));
    match digits.map(str::trim).and_then(|d| current.press.get(d)) {
        Some(IvrAction::Menu(next)) => match ivr.menus.get(next) {
            Some(m) => Turn::Ask {
                say: vec![Speech::Say(flows.render_plain(&m.say))],
                menu: next.clone(),
                attempt: 0,
            },
            None => Turn::End(vec![goodbye()]),
        },
        Some(IvrAction::Say(text)) => {
            Turn::End(vec![Speech::Say(flows.render_plain(text)), goodbye()])
        }
        Some(IvrAction::Hangup) => Turn::End(vec![goodbye()]),
        Some(action) => Turn::Act(action.clone()),
        None if attempt >= ivr.retries => Turn::End(vec![goodbye()]),
        None => Turn::Ask {
            say: vec![
                Speech::Say(flows.render_plain(&ivr.reprompt)),
                Speech::Say(flows.render_plain(&current.say)),
            ],
            menu: menu.to_string(),
            attempt: attempt + 1,
        },
    }
}

/// The event a key's action runs against the caller's number ([`Turn::Act`] carries only
/// these three).
pub fn action_event(action: &IvrAction) -> Event {
    match action {
        IvrAction::ReadCode => Event::VoiceCodeRequested,
        IvrAction::OptIn => Event::VoiceOptIn,
        _ => Event::VoiceOptOut,
    }
}

/// What to speak after an action ran with `outcome` (`code`: the code it issued; `caller`:
/// the caller's record, for the texts shared with SMS, which may name its fields).
pub fn after_action(
    flows: &Flows,
    action: &IvrAction,
    outcome: Outcome,
    code: Option<&str>,
    caller: Option<&Subscriber>,
) -> Vec<Speech> {
    let plain = |t: &Template| Speech::Say(t.render(|n| placeholder(flows, caller, n)));
    let mut out = match (action, outcome, code) {
        (IvrAction::ReadCode, Outcome::CodeSent, Some(code)) => {
            let spoken = flows.ivr.read_code.render(|n| match n {
                "code" => Some(spell(code)),
                other => placeholder(flows, None, other),
            });
            vec![
                Speech::Say(spoken.clone()),
                Speech::Pause(1),
                Speech::Say(spoken),
            ]
        }
        (_, Outcome::RateLimited { everyone, .. }, _) => vec![plain(if everyone {
            &flows.verify.busy
        } else {
            &flows.verify.rate_limited
        })],
        (_, Outcome::OptedOut, _) if *action != IvrAction::OptOut => {
            vec![plain(&flows.ivr.opted_out)]
        }
        // Texted: `opt_in`, and `read_code` to a caller it may not trust with the code.
        (IvrAction::OptIn | IvrAction::ReadCode, Outcome::CodeSent, _) => {
            vec![plain(&flows.ivr.texted)]
        }
        (IvrAction::OptIn, _, _) => vec![plain(&flows.ivr.already_joined)],
        (IvrAction::OptOut, _, _) => vec![plain(&flows.ivr.opted_out)],
        _ => Vec::new(),
    };
    out.push(plain(&flows.ivr.goodbye));
    out
}

/// `"042"` → `"0, 4, 2"`: text-to-speech reads each digit, with a pause between.
pub fn spell(code: &str) -> String {
    code.chars()
        .map(String::from)
        .collect::<Vec<_>>()
        .join(", ")
}
