//! The pythonic tool-call format, `[get_weather(city="Paris", days=3), now()]`, read by a
//! small parser for Python call syntax with literal arguments (strings, numbers, True, False,
//! None, lists, tuples, dicts), never evaluated. Arguments become a JSON object.

use serde_json::{Map, Number, Value};

use super::formats::{RawCall, Scan, Status};

/// Why parsing stopped.
enum Stop {
    /// The text ends inside the calls.
    More,
    /// The text is not a pythonic call list.
    Bad,
}

type Parsed<T> = Result<T, Stop>;

struct Parser<'a> {
    s: &'a str,
    at: usize,
}

/// Reads `[call, ...]` from the start of `region`.
pub fn scan(region: &str) -> Scan {
    let mut p = Parser { s: region, at: 0 };
    let mut calls = Vec::new();
    let mut consumed = 0;
    let status = match p.calls(&mut calls, &mut consumed) {
        Ok(()) => {
            consumed = p.at;
            p.ws();
            if p.at == region.len() {
                consumed = region.len();
                Status::Done
            } else {
                Status::Invalid
            }
        }
        Err(Stop::More) => Status::More,
        Err(Stop::Bad) => Status::Invalid,
    };
    Scan {
        calls,
        consumed,
        status,
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.s[self.at..].chars().next()
    }

    /// The next character, or `More` at the end of the text.
    fn next_char(&mut self) -> Parsed<char> {
        let c = self.peek().ok_or(Stop::More)?;
        self.at += c.len_utf8();
        Ok(c)
    }

    fn ws(&mut self) {
        self.at = self.s.len() - self.s[self.at..].trim_start().len();
    }

    fn expect(&mut self, want: char) -> Parsed<()> {
        self.ws();
        match self.next_char()? {
            c if c == want => Ok(()),
            _ => Err(Stop::Bad),
        }
    }

    /// Consumes `c` (after whitespace) if it comes next.
    fn eat(&mut self, c: char) -> Parsed<bool> {
        self.ws();
        match self.peek() {
            None => Err(Stop::More),
            Some(x) if x == c => {
                self.at += c.len_utf8();
                Ok(true)
            }
            Some(_) => Ok(false),
        }
    }

    /// `[` call (`,` call)* `,`? `]`, pushing each complete call and the bytes read so far.
    fn calls(&mut self, calls: &mut Vec<RawCall>, consumed: &mut usize) -> Parsed<()> {
        self.expect('[')?;
        loop {
            // Also refuses `[]` and lists of anything but calls.
            if !self.peek_is_ident_start()? {
                return Err(Stop::Bad);
            }
            calls.push(self.call()?);
            *consumed = self.at;
            if !self.eat(',')? {
                return self.expect(']');
            }
            if self.eat(']')? {
                return Ok(());
            }
        }
    }

    fn peek_is_ident_start(&mut self) -> Parsed<bool> {
        self.ws();
        let c = self.peek().ok_or(Stop::More)?;
        Ok(c.is_ascii_alphabetic() || c == '_')
    }

    /// An identifier; `More` when the text ends inside it.
    fn ident(&mut self) -> Parsed<&str> {
        self.ws();
        let start = self.at;
        match self.peek() {
            None => return Err(Stop::More),
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
            Some(_) => return Err(Stop::Bad),
        }
        let len = self.s[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or(Stop::More)?;
        self.at = start + len;
        Ok(&self.s[start..self.at])
    }

    /// `name(.name)*(key=value, ...)`.
    fn call(&mut self) -> Parsed<RawCall> {
        let mut name = self.ident()?.to_owned();
        while self.eat('.')? {
            name.push('.');
            name.push_str(self.ident()?);
        }
        self.expect('(')?;
        let mut args = Map::new();
        loop {
            if self.eat(')')? {
                break;
            }
            let key = self.ident()?.to_owned();
            self.expect('=')?;
            let value = self.value()?;
            args.insert(key, value);
            if !self.eat(',')? {
                self.expect(')')?;
                break;
            }
        }
        Ok(RawCall {
            name,
            arguments: Value::Object(args).to_string(),
        })
    }

    fn value(&mut self) -> Parsed<Value> {
        self.ws();
        match self.peek().ok_or(Stop::More)? {
            '\'' | '"' => self.string().map(Value::String),
            '[' => self.sequence('[', ']'),
            '(' => self.sequence('(', ')'),
            '{' => self.dict(),
            c if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' => self.number(),
            _ => match self.ident()? {
                "True" => Ok(Value::Bool(true)),
                "False" => Ok(Value::Bool(false)),
                "None" => Ok(Value::Null),
                _ => Err(Stop::Bad),
            },
        }
    }

    fn sequence(&mut self, open: char, close: char) -> Parsed<Value> {
        self.expect(open)?;
        let mut items = Vec::new();
        loop {
            if self.eat(close)? {
                return Ok(Value::Array(items));
            }
            items.push(self.value()?);
            if !self.eat(',')? {
                self.expect(close)?;
                return Ok(Value::Array(items));
            }
        }
    }

    fn dict(&mut self) -> Parsed<Value> {
        self.expect('{')?;
        let mut map = Map::new();
        loop {
            if self.eat('}')? {
                return Ok(Value::Object(map));
            }
            self.ws();
            let key = match self.peek().ok_or(Stop::More)? {
                '\'' | '"' => self.string()?,
                _ => return Err(Stop::Bad),
            };
            self.expect(':')?;
            map.insert(key, self.value()?);
            if !self.eat(',')? {
                self.expect('}')?;
                return Ok(Value::Object(map));
            }
        }
    }

    /// A Python string literal in single or double quotes, with the common escapes.
    fn string(&mut self) -> Parsed<String> {
        let quote = self.next_char()?;
        let mut out = String::new();
        loop {
            match self.next_char()? {
                c if c == quote => return Ok(out),
                '\n' => return Err(Stop::Bad),
                '\\' => match self.next_char()? {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '0' => out.push('\0'),
                    '\n' => {}
                    'x' => out.push(self.hex_char(2)?),
                    'u' => out.push(self.hex_char(4)?),
                    'U' => out.push(self.hex_char(8)?),
                    c @ ('\\' | '\'' | '"') => out.push(c),
                    c => {
                        out.push('\\');
                        out.push(c);
                    }
                },
                c => out.push(c),
            }
        }
    }

    fn hex_char(&mut self, digits: usize) -> Parsed<char> {
        let mut code = 0u32;
        for _ in 0..digits {
            let d = self.next_char()?.to_digit(16).ok_or(Stop::Bad)?;
            code = code * 16 + d;
        }
        char::from_u32(code).ok_or(Stop::Bad)
    }

    /// An int or a float; `More` when the text ends inside it.
    fn number(&mut self) -> Parsed<Value> {
        let start = self.at;
        let len = self.s[start..]
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '+' | '-' | '.' | 'e' | 'E' | '_')))
            .ok_or(Stop::More)?;
        self.at = start + len;
        let text: String = self.s[start..self.at]
            .chars()
            .filter(|&c| c != '_')
            .collect();
        let text = text.strip_prefix('+').unwrap_or(&text);
        if let Ok(i) = text.parse::<i64>() {
            return Ok(Value::Number(i.into()));
        }
        text.parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or(Stop::Bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(text: &str) -> (Vec<(String, Value)>, Status) {
        let s = scan(text);
        let calls = s
            .calls
            .into_iter()
            .map(|c| {
                (
                    c.name,
                    serde_json::from_str(&c.arguments).unwrap_or(Value::Null),
                )
            })
            .collect();
        (calls, s.status)
    }

    #[test]
    fn literals_become_json_arguments() {
        let (c, status) = calls(
            r#"[get_weather(city="Paris", days=3, t=-1.5, ok=True, x=None, tags=['a', "b\n"], box=(1, 2), m={'k': False}), now()]"#,
        );
        assert_eq!(status, Status::Done);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].0, "get_weather");
        assert_eq!(
            c[0].1,
            serde_json::json!({"city": "Paris", "days": 3, "t": -1.5, "ok": true, "x": null,
                "tags": ["a", "b\n"], "box": [1, 2], "m": {"k": false}})
        );
        assert_eq!(c[1], ("now".to_owned(), serde_json::json!({})));
    }

    #[test]
    fn a_cut_list_waits_and_a_wrong_one_is_invalid() {
        let (c, status) = calls("[f(a=1), g(b='x");
        assert_eq!((c.len(), status), (1, Status::More));
        assert_eq!(calls("[f(a=12").1, Status::More);
        assert_eq!(calls("[f(a=os.system('x'))]").1, Status::Invalid);
        assert_eq!(calls("[1, 2]").1, Status::Invalid);
        assert_eq!(calls("[f(a=1)] then text").1, Status::Invalid);
        assert_eq!(calls("[]").1, Status::Invalid);
    }
}
