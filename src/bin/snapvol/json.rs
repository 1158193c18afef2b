//! A small JSON writer for `--json` output: flat objects and arrays are all the CLI prints,
//! so a full serializer is not worth its compile time.

pub enum Value {
    Str(String),
    Num(u64),
    Bool(bool),
    Null,
    Arr(Vec<Value>),
    Obj(Vec<(&'static str, Value)>),
}

impl Value {
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Value::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Value::Num(n) => out.push_str(&n.to_string()),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Null => out.push_str("null"),
            Value::Arr(v) => {
                out.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    x.write(out);
                }
                out.push(']');
            }
            Value::Obj(v) => {
                out.push('{');
                for (i, (k, x)) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    Value::Str(k.to_string()).write(out);
                    out.push(':');
                    x.write(out);
                }
                out.push('}');
            }
        }
    }
}

pub fn id(id: impl Into<u128>) -> Value {
    Value::Str(format!("{:032x}", id.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let v = Value::Obj(vec![
            ("a", Value::Num(1)),
            ("b", Value::Str("x\"y\n".into())),
            ("c", Value::Arr(vec![Value::Null, Value::Bool(true)])),
        ]);
        assert_eq!(v.render(), r#"{"a":1,"b":"x\"y\n","c":[null,true]}"#);
    }
}
