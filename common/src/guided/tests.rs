use super::*;
use crate::checkpoint::tokenizer_train;

fn compiler() -> GuidedCompiler {
    let tok = Tokenizer::from_inner(tokenizer_train::train(2048).unwrap());
    let eos = tok.token_to_id(crate::checkpoint::EOT).unwrap();
    GuidedCompiler::new(&tok, 2048, &[eos]).unwrap()
}

/// Feeds `text` through the matcher token by token, checking each token was allowed.
fn feed(c: &GuidedCompiler, m: &mut Matcher, text: &str) {
    let tok = c.factory.tok_env().clone();
    for t in tok.tokenize(text) {
        let mask = m.compute_mask().unwrap();
        assert!(
            mask.is_allowed(t),
            "token {t} ({:?}) of {text:?} was masked after {:?}",
            tok.tok_trie().token_str(t),
            m.get_error()
        );
        m.consume_token(t).unwrap();
    }
}

#[test]
fn a_json_schema_allows_its_documents_and_masks_everything_else() {
    let c = compiler();
    let schema = r#"{"type":"object","properties":{"n":{"type":"integer"},"c":{"enum":["red","blue"]}},"required":["n","c"],"additionalProperties":false}"#;
    let mut m = c.matcher(&Constraint::JsonSchema(schema.into())).unwrap();
    let first = m.compute_mask().unwrap();
    let allowed: Vec<u32> = first.iter().collect();
    let env = c.factory.tok_env().clone();
    assert!(!allowed.is_empty());
    for t in allowed {
        assert!(
            env.tok_trie().token(t).starts_with(b"{"),
            "token {t} allowed first"
        );
    }
    feed(&c, &mut m, r#"{"n": 42, "c": "blue"}"#);
    assert!(m.is_accepting().unwrap());
    let eos = env.tok_trie().eos_token();
    assert!(m.compute_mask_or_eos().unwrap().is_allowed(eos));
}

#[test]
fn a_bad_schema_says_where_it_is_wrong() {
    let c = compiler();
    let e = c
        .check(&Constraint::JsonSchema("{\"type\": \"object\",}".into()))
        .unwrap_err();
    assert!(e.to_string().contains("line 1 column"), "{e}");
    let e = c
        .check(&Constraint::JsonSchema(r#"{"type": "objekt"}"#.into()))
        .unwrap_err();
    assert!(e.to_string().contains("objekt"), "{e}");
    let e = c.check(&Constraint::Regex("a(b".into())).unwrap_err();
    assert!(e.to_string().starts_with("invalid regex"), "{e}");
    let e = c.check(&Constraint::Lark("start: foo".into())).unwrap_err();
    assert!(e.to_string().contains("foo"), "{e}");
    let e = c
        .check(&Constraint::Lark("root ::= \"a\"".into()))
        .unwrap_err();
    assert!(e.to_string().contains("Lark"), "{e}");
}

#[test]
fn a_choice_allows_only_its_strings() {
    let c = compiler();
    let choice = Constraint::Choice(vec!["yes".into(), "no (really)".into()]);
    let mut m = c.matcher(&choice).unwrap();
    feed(&c, &mut m, "no (really)");
    assert!(m.is_accepting().unwrap());
    // The cache hands out a fresh matcher for the same constraint.
    let mut again = c.matcher(&choice).unwrap();
    feed(&c, &mut again, "yes");
    assert!(again.is_accepting().unwrap());
    let env = c.factory.tok_env().clone();
    let z = env.tokenize("z")[0];
    let mut third = c.matcher(&choice).unwrap();
    assert!(!third.compute_mask().unwrap().is_allowed(z));
}

#[test]
fn a_structural_tag_frees_text_and_constrains_each_tag() {
    let c = compiler();
    let tag = r#"{"type":"structural_tag","structures":[{"begin":"<f=a>","schema":{"type":"object","properties":{"x":{"type":"integer"}},"required":["x"]},"end":"</f>"}],"triggers":["<f="]}"#;
    let mut m = c.matcher(&Constraint::StructuralTag(tag.into())).unwrap();
    feed(&c, &mut m, "hello <f=a>{\"x\": 1}</f> bye");
    assert!(m.is_accepting().unwrap());
    let e = c
        .check(&Constraint::StructuralTag(
            r#"{"structures":[],"triggers":["<"]}"#.into(),
        ))
        .unwrap_err();
    assert!(e.to_string().contains("structures"), "{e}");
}
