//! The parts of a step that talk to others: `{steps.NAME.KEY}` references and `when`
//! conditions (checked against the steps before it), and the `ask` kind.

use std::collections::BTreeMap;

use super::read::{self, Ctx, Fields, Val};
use super::templates::{compile_anchored, timeout};
use crate::domain::outputs::{self, Condition};
use crate::domain::steps::StepSpec;
use crate::domain::vocab::Audience;

/// Buttons in one message stay usable on a phone.
const MAX_CHOICES: usize = 20;

/// The step names a step may refer to (those before it) and all of them (to say
/// "later" rather than "unknown").
pub(super) struct Steps<'a> {
    pub earlier: &'a [&'a str],
    pub all: &'a [&'a str],
}

impl Steps<'_> {
    /// Why `{inner}` (a `steps.NAME.KEY` reference) is not allowed in step `own`.
    pub fn refusal(&self, inner: &str, own: &str) -> Option<String> {
        if outputs::split_ref(inner, self.earlier).is_some() {
            return None;
        }
        let name = |names: &[&str]| outputs::split_ref(inner, names).map(|(n, _)| n.to_string());
        Some(match name(self.all) {
            Some(n) if n == own => format!("step {own} refers to its own output {{{inner}}}"),
            Some(n) => format!(
                "step {own} refers to {{{inner}}}, but step {n} runs later; only earlier steps' outputs exist"
            ),
            None => {
                let rest = inner.strip_prefix(outputs::REF_PREFIX).unwrap_or(inner);
                if rest.contains('.') {
                    format!(
                        "step {own} refers to {{{inner}}}: no earlier step has that name (steps before it: {})",
                        if self.earlier.is_empty() {
                            "none".to_string()
                        } else {
                            self.earlier.join(", ")
                        }
                    )
                } else {
                    format!("step {own}: {{{inner}}} needs the form {{steps.NAME.KEY}}")
                }
            }
        })
    }
}

/// `when = { "steps.NAME.KEY" = value | [values] }`; values compare as text.
pub(super) fn condition(
    ctx: &mut Ctx,
    v: &Val,
    path: &str,
    steps: &Steps,
    own: &str,
) -> Option<Condition> {
    let Some(table) = v.get_ref().as_table() else {
        read::type_error(
            ctx,
            v,
            path,
            "a table like { \"steps.NAME.KEY\" = \"value\" }",
        );
        return None;
    };
    if table.is_empty() {
        ctx.problem(
            &v.span(),
            path,
            "when needs at least one \"steps.NAME.KEY\" = value",
        );
        return None;
    }
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (key, value) in table.iter() {
        let reference: &str = key.get_ref();
        let kpath = read::child(path, reference);
        if let Some(message) = steps.refusal(reference, own) {
            ctx.problem(&key.span(), &kpath, message);
            ok = false;
        }
        let wanted = match read::json(ctx, value, &kpath) {
            Some(serde_json::Value::Array(items)) if !items.is_empty() => {
                items.iter().map(outputs::as_text).collect()
            }
            Some(serde_json::Value::Array(_)) => {
                ctx.problem(&value.span(), &kpath, "an empty list of values never holds");
                ok = false;
                Vec::new()
            }
            Some(serde_json::Value::Object(_)) => {
                read::type_error(ctx, value, &kpath, "a value or a list of values");
                ok = false;
                Vec::new()
            }
            Some(other) => vec![outputs::as_text(&other)],
            None => {
                ok = false;
                Vec::new()
            }
        };
        out.insert(reference.to_string(), wanted);
    }
    ok.then_some(Condition(out))
}

pub(super) fn ask(ctx: &mut Ctx, f: &Fields) -> Option<StepSpec> {
    let question = f.required(ctx, "question").and_then(|qv| {
        let path = f.path("question");
        let q = read::string(ctx, qv, &path)?;
        if q.trim().is_empty() || q.chars().count() > 1000 {
            ctx.problem(&qv.span(), &path, "a question must be 1 to 1000 characters");
        }
        Some(q)
    });
    let mut choices = Vec::new();
    if let Some(cv) = f.get("choices") {
        let path = f.path("choices");
        let items = read::strings(ctx, cv, &path).unwrap_or_default();
        if items.is_empty() || items.len() > MAX_CHOICES {
            let message = format!("choices must list 1 to {MAX_CHOICES} answers");
            ctx.problem(&cv.span(), &path, message);
        }
        for (choice, span) in items {
            if choice.trim().is_empty() || choice.chars().count() > 64 {
                ctx.problem(&span, &path, "a choice must be 1 to 64 characters");
            } else if choices.contains(&choice) {
                let message = format!("choice {choice:?} is listed twice");
                ctx.problem(&span, &path, message);
            } else {
                choices.push(choice);
            }
        }
    }
    let (mut pattern, mut help, mut regex) = (None, None, None);
    if let Some(rv) = f.get("reply") {
        let path = f.path("reply");
        if let Some(rf) = Fields::new(ctx, rv, &path, &["pattern", "help"]) {
            help = rf.string(ctx, "help");
            if let Some(pv) = rf.required(ctx, "pattern") {
                let ppath = rf.path("pattern");
                if let Some(source) = read::string(ctx, pv, &ppath) {
                    match compile_anchored(&source) {
                        Ok(r) => regex = Some(r),
                        Err(e) => ctx.problem(&pv.span(), &ppath, e),
                    }
                    pattern = Some(source);
                }
            }
        }
    }
    match (f.get("choices"), f.get("reply")) {
        (Some(_), Some(rv)) => ctx.problem(
            &rv.span(),
            &f.path("reply"),
            "set choices or reply, not both",
        ),
        (None, None) => ctx.problem(
            &f.span,
            &f.path("choices"),
            "an ask step needs choices = [...] or reply = { pattern = '...' }",
        ),
        _ => {}
    }
    let timeout_ms = timeout(ctx, f);
    let to = f.get("to").and_then(|tv| {
        let path = f.path("to");
        let s = read::string(ctx, tv, &path)?;
        s.parse::<Audience>()
            .map_err(|_| {
                let message =
                    format!("unknown audience {s:?} (expected proposer, approvers or operators)");
                ctx.problem(&tv.span(), &path, message)
            })
            .ok()
    });
    let default = f.string(ctx, "default");
    if let (Some(d), Some(dv)) = (&default, f.get("default")) {
        let valid = if choices.is_empty() {
            regex.as_ref().is_none_or(|r| r.is_match(d))
        } else {
            choices.contains(d)
        };
        if !valid {
            let allowed = if choices.is_empty() {
                format!("it must match {}", pattern.as_deref().unwrap_or(""))
            } else {
                format!("it must be one of {}", choices.join(", "))
            };
            let message = format!("default {d:?} is not a valid answer: {allowed}");
            ctx.problem(&dv.span(), &f.path("default"), message);
        }
    }
    if default.is_some() && timeout_ms.is_none() {
        let message = "a default is given at the timeout: set timeout too";
        ctx.problem(&f.span, &f.path("default"), message);
    }
    Some(StepSpec::Ask {
        question: question?,
        choices,
        pattern,
        help,
        timeout_ms,
        default,
        to: to.unwrap_or(Audience::Approvers),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::parse;
    use crate::domain::steps::StepSpec;

    #[test]
    fn references_and_conditions_must_name_earlier_steps() {
        let src = r#"
    [templates.t]
    risk = "low"
    steps = [
      { name = "a", kind = "noop" },
      { name = "b", kind = "shell", run = ["echo", "{steps.a.x}", "{steps.c.y}", "{steps.b.z}", "{steps.nope.k}"] },
      { name = "c", kind = "noop", when = { "steps.zz.k" = "1", "steps.a.k" = [] } },
      { name = "d", kind = "ask", question = "q {steps.c.k}?", choices = ["x", "y"], default = "z", timeout = "1m" },
      { name = "e", kind = "ask", question = "q", choices = ["x"], reply = { pattern = "^a$" } },
      { name = "f", kind = "ask", question = "q" },
      { name = "g", kind = "ask", question = "q", reply = { pattern = '^.{1,5}$' }, default = "toolong", timeout = "1m" },
      { name = "h", kind = "noop", when = { "steps.g.answer" = "yes" } },
    ]
    "#;
        let problems = parse(src).expect_err("must fail");
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}:{} {}", p.line, p.path, p.message))
            .collect();
        let all = text.join("\n");
        for want in [
            "step c runs later",
            "its own output {steps.b.z}",
            "{steps.nope.k}: no earlier step",
            "steps.zz.k",
            "an empty list of values never holds",
            "default \"z\" is not a valid answer",
            "set choices or reply, not both",
            "needs choices",
            "default \"toolong\" is not a valid answer",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(!all.contains("steps.a.x"), "{all}");
        assert!(!all.contains("steps.g.answer"), "{all}");
        // A pattern's braces are its own, not placeholders.
        assert!(!all.contains("undeclared param"), "{all}");
    }

    #[test]
    fn ask_steps_and_conditions_are_parsed() {
        let src = r#"
    [approval]
    remind = "2h"

    [templates.post]
    risk = "low"
    steps = [
      { name = "draft", kind = "noop" },
      { name = "go", kind = "ask", question = "Publish {steps.draft.title}?", choices = ["publish", "drop"], timeout = "4h", default = "drop", to = "proposer" },
      { name = "publish", kind = "noop", when = { "steps.go.answer" = ["publish", 7] } },
    ]
    "#;
        let policy = parse(src).expect("valid");
        assert_eq!(policy.approval.remind, Some(Duration::from_secs(7200)));
        let t = policy.template("post").expect("template");
        let when = t.steps[2].when.as_ref().expect("when");
        assert_eq!(when.0["steps.go.answer"], vec!["publish", "7"]);
        let StepSpec::Ask { to, default, .. } = &t.steps[1].spec else {
            panic!("ask");
        };
        assert_eq!(*to, crate::domain::vocab::Audience::Proposer);
        assert_eq!(default.as_deref(), Some("drop"));
    }
}
