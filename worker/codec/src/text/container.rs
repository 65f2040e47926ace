//! Values built of other values: composite records, ranges, arrays, hstore and pgvector.
//! Quoting follows PostgreSQL's `record_out`, `range_bound_escape`, `array_out` and
//! `hstore_out`; parsing follows their `_in` counterparts for what `_out` prints.

use std::fmt::Write;
use std::sync::Arc;

use super::{UNKNOWN, decode_inner, render_into, scalar};
use crate::schema::{TypeInfo, TypeKind};
use crate::value::{RangeValue, Value};

/// A character cursor over the text being parsed.
struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            chars: text.chars().peekable(),
        }
    }
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }
    fn next(&mut self) -> Option<char> {
        self.chars.next()
    }
    fn expect(&mut self, want: char) -> Result<(), String> {
        match self.next() {
            Some(c) if c == want => Ok(()),
            Some(c) => Err(format!("expected {want:?}, found {c:?}")),
            None => Err(format!("expected {want:?}, found the end")),
        }
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.next();
        }
    }
}

/// PostgreSQL's `scanner_isspace`.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// One field of a record or one bound of a range: quoted parts (with `""` and `\x`),
/// unquoted parts (with `\x`), up to one of `ends` outside quotes. `None` when the field
/// is empty and unquoted (NULL / unbounded).
fn read_field(cur: &mut Cursor<'_>, ends: &[char]) -> Result<Option<String>, String> {
    let mut out = String::new();
    let mut quoted_any = false;
    let mut in_quotes = false;
    loop {
        let Some(c) = cur.peek() else {
            return Err("unterminated value".into());
        };
        if !in_quotes && ends.contains(&c) {
            break;
        }
        cur.next();
        match c {
            '\\' => out.push(cur.next().ok_or("backslash at the end")?),
            '"' if in_quotes => {
                if cur.peek() == Some('"') {
                    cur.next();
                    out.push('"');
                } else {
                    in_quotes = false;
                }
            }
            '"' => {
                in_quotes = true;
                quoted_any = true;
            }
            c => out.push(c),
        }
    }
    Ok(if out.is_empty() && !quoted_any {
        None
    } else {
        Some(out)
    })
}

/// Writes `text` quoted the record/range way when it is empty or holds a special
/// character: `"` and `\` doubled inside the quotes.
fn push_quoted_field(text: &str, specials: &[char], out: &mut String) {
    let needs = text.is_empty() || text.chars().any(|c| specials.contains(&c) || is_space(c));
    if !needs {
        out.push_str(text);
        return;
    }
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('"');
}

fn element_decode(ty: &TypeInfo, text: &str) -> Result<Value, String> {
    decode_inner(ty, text).map_err(|e| format!("{} {text:?}: {e}", display_name(ty)))
}

fn display_name(ty: &TypeInfo) -> &str {
    if ty.name.is_empty() {
        "element"
    } else {
        &ty.name
    }
}

pub(super) fn parse_composite(
    fields: &[(String, Arc<TypeInfo>)],
    text: &str,
) -> Result<Value, String> {
    let mut cur = Cursor::new(text);
    cur.expect('(')?;
    let mut values = Vec::with_capacity(fields.len());
    for (i, (name, ty)) in fields.iter().enumerate() {
        let value = match read_field(&mut cur, &[',', ')'])? {
            None => Value::Null,
            Some(t) => decode_inner(ty, &t).map_err(|e| format!("field {name}: {e}"))?,
        };
        values.push(value);
        cur.expect(if i + 1 == fields.len() { ')' } else { ',' })?;
    }
    if fields.is_empty() {
        cur.expect(')')?;
    }
    if cur.next().is_some() {
        return Err("text after the closing parenthesis".into());
    }
    Ok(Value::Composite(values))
}

pub(super) fn render_composite(ty: &TypeInfo, values: &[Value], out: &mut String) {
    out.push('(');
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if *value == Value::Null {
            continue;
        }
        let field_ty = match &ty.kind {
            TypeKind::Composite(fields) => fields.get(i).map(|(_, t)| t.as_ref()),
            _ => None,
        };
        let mut text = String::new();
        render_into(field_ty.unwrap_or(&UNKNOWN), value, &mut text);
        push_quoted_field(&text, &['"', '\\', '(', ')', ','], out);
    }
    out.push(')');
}

pub(super) fn parse_range(element: &TypeInfo, text: &str) -> Result<Value, String> {
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("empty") {
        return Ok(Value::Range(Box::new(RangeValue::Empty)));
    }
    let mut cur = Cursor::new(trimmed);
    cur.skip_ws();
    let lower_inclusive = match cur.next() {
        Some('[') => true,
        Some('(') => false,
        _ => return Err("expected [ or ( or empty".into()),
    };
    let lower = read_field(&mut cur, &[','])?;
    cur.expect(',')?;
    let upper = read_field(&mut cur, &[']', ')'])?;
    let upper_inclusive = match cur.next() {
        Some(']') => true,
        Some(')') => false,
        _ => return Err("expected ] or )".into()),
    };
    cur.skip_ws();
    if cur.next().is_some() {
        return Err("text after the range".into());
    }
    let bound = |t: Option<String>| -> Result<Option<Value>, String> {
        t.map(|t| element_decode(element, &t)).transpose()
    };
    Ok(Value::Range(Box::new(RangeValue::Bounds {
        lower: bound(lower)?,
        upper: bound(upper)?,
        lower_inclusive,
        upper_inclusive,
    })))
}

pub(super) fn render_range(ty: &TypeInfo, range: &RangeValue, out: &mut String) {
    let element = match &ty.kind {
        TypeKind::Range(e) => e.as_ref(),
        _ => &UNKNOWN,
    };
    match range {
        RangeValue::Empty => out.push_str("empty"),
        RangeValue::Bounds {
            lower,
            upper,
            lower_inclusive,
            upper_inclusive,
        } => {
            out.push(if *lower_inclusive { '[' } else { '(' });
            let specials = ['"', '\\', '(', ')', '[', ']', ','];
            if let Some(v) = lower {
                let mut t = String::new();
                render_into(element, v, &mut t);
                push_quoted_field(&t, &specials, out);
            }
            out.push(',');
            if let Some(v) = upper {
                let mut t = String::new();
                render_into(element, v, &mut t);
                push_quoted_field(&t, &specials, out);
            }
            out.push(if *upper_inclusive { ']' } else { ')' });
        }
    }
}

/// Array element delimiter: `;` for box, `,` for everything else.
fn delimiter(element: &TypeInfo) -> char {
    if element.name == "box" { ';' } else { ',' }
}

/// Nested array text, before the elements are decoded.
enum Node {
    Null,
    Text(String),
    List(Vec<Node>),
}

fn parse_node(cur: &mut Cursor<'_>, delim: char) -> Result<Node, String> {
    cur.skip_ws();
    if cur.peek() == Some('{') {
        cur.next();
        let mut items = Vec::new();
        cur.skip_ws();
        if cur.peek() == Some('}') {
            cur.next();
            return Ok(Node::List(items));
        }
        loop {
            items.push(parse_node(cur, delim)?);
            cur.skip_ws();
            match cur.next() {
                Some('}') => return Ok(Node::List(items)),
                Some(c) if c == delim => {}
                Some(c) => return Err(format!("expected {delim:?} or '}}', found {c:?}")),
                None => return Err("unterminated array".into()),
            }
        }
    }
    // A scalar element: quoted (backslash escapes) or bare (trimmed, NULL is NULL).
    if cur.peek() == Some('"') {
        cur.next();
        let mut out = String::new();
        loop {
            match cur.next() {
                Some('\\') => out.push(cur.next().ok_or("backslash at the end")?),
                Some('"') => return Ok(Node::Text(out)),
                Some(c) => out.push(c),
                None => return Err("unterminated quoted element".into()),
            }
        }
    }
    let mut out = String::new();
    let mut kept = 0; // length up to the last escaped or non-space character
    while let Some(c) = cur.peek() {
        if c == delim || c == '}' {
            break;
        }
        cur.next();
        if c == '\\' {
            out.push(cur.next().ok_or("backslash at the end")?);
            kept = out.len();
        } else {
            out.push(c);
            if !is_space(c) {
                kept = out.len();
            }
        }
    }
    out.truncate(kept);
    if out.eq_ignore_ascii_case("NULL") {
        return Ok(Node::Null);
    }
    if out.is_empty() {
        return Err("empty unquoted array element".into());
    }
    Ok(Node::Text(out))
}

/// Flattens nested lists row-major, checking that every sub-array of a level has the
/// same length.
fn flatten(
    node: Node,
    depth: usize,
    lengths: &mut Vec<usize>,
    element: &TypeInfo,
    out: &mut Vec<Value>,
) -> Result<(), String> {
    let leaf = |lengths: &Vec<usize>| {
        if lengths.len() == depth {
            Ok(())
        } else {
            Err("elements and sub-arrays mixed at one level".to_owned())
        }
    };
    match node {
        Node::List(items) => {
            if !out.is_empty() && depth >= lengths.len() {
                return Err("elements and sub-arrays mixed at one level".into());
            }
            if lengths.len() == depth {
                lengths.push(items.len());
            } else if lengths.get(depth) != Some(&items.len()) {
                return Err("multidimensional arrays must have sub-arrays of equal size".into());
            }
            for item in items {
                flatten(item, depth + 1, lengths, element, out)?;
            }
        }
        Node::Null => {
            leaf(lengths)?;
            out.push(Value::Null);
        }
        Node::Text(t) => {
            leaf(lengths)?;
            out.push(element_decode(element, &t)?);
        }
    }
    Ok(())
}

pub(super) fn parse_array(element: &TypeInfo, text: &str) -> Result<Value, String> {
    let mut lower_bounds = Vec::new();
    let body = if text.starts_with('[') {
        let (dims, body) = text
            .split_once('=')
            .ok_or("dimension decoration without =")?;
        for dim in dims.split(']').filter(|d| !d.is_empty()) {
            let dim = dim.strip_prefix('[').ok_or("expected [lower:upper]")?;
            let (lo, _) = dim.split_once(':').ok_or("expected [lower:upper]")?;
            lower_bounds.push(lo.parse::<i32>().map_err(|e| format!("lower bound: {e}"))?);
        }
        body
    } else {
        text
    };
    let mut cur = Cursor::new(body);
    let root = parse_node(&mut cur, delimiter(element))?;
    cur.skip_ws();
    if cur.next().is_some() || !matches!(root, Node::List(_)) {
        return Err("expected one {…} array".into());
    }
    let mut lengths = Vec::new();
    let mut elements = Vec::new();
    flatten(root, 0, &mut lengths, element, &mut elements)?;
    if elements.is_empty() {
        return Ok(Value::Array {
            dims: Vec::new(),
            elements,
        });
    }
    if !lower_bounds.is_empty() && lower_bounds.len() != lengths.len() {
        return Err("dimension decoration does not match the nesting".into());
    }
    let dims = lengths
        .iter()
        .enumerate()
        .map(|(i, len)| {
            let len = i32::try_from(*len).map_err(|_| "array too long".to_owned())?;
            Ok((len, lower_bounds.get(i).copied().unwrap_or(1)))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Value::Array { dims, elements })
}

pub(super) fn render_array(
    ty: &TypeInfo,
    dims: &[(i32, i32)],
    elements: &[Value],
    out: &mut String,
) {
    let element = match &ty.kind {
        TypeKind::Array(e) => e.as_ref(),
        _ => &UNKNOWN,
    };
    if dims.is_empty() || elements.is_empty() {
        out.push_str("{}");
        return;
    }
    if dims.iter().any(|(_, lower)| *lower != 1) {
        for (len, lower) in dims {
            let _ = write!(out, "[{lower}:{}]", i64::from(*lower) + i64::from(*len) - 1);
        }
        out.push('=');
    }
    let delim = delimiter(element);
    let mut index = 0;
    render_level(element, dims, 0, elements, &mut index, delim, out);
}

fn render_level(
    element: &TypeInfo,
    dims: &[(i32, i32)],
    depth: usize,
    elements: &[Value],
    index: &mut usize,
    delim: char,
    out: &mut String,
) {
    out.push('{');
    let len = dims.get(depth).map(|(l, _)| *l).unwrap_or(0).max(0);
    for i in 0..len {
        if i > 0 {
            out.push(delim);
        }
        if depth + 1 < dims.len() {
            render_level(element, dims, depth + 1, elements, index, delim, out);
            continue;
        }
        match elements.get(*index) {
            None | Some(Value::Null) => out.push_str("NULL"),
            Some(v) => {
                let mut t = String::new();
                render_into(element, v, &mut t);
                let needs = t.is_empty()
                    || t.eq_ignore_ascii_case("NULL")
                    || t.chars()
                        .any(|c| matches!(c, '"' | '\\' | '{' | '}') || c == delim || is_space(c));
                if needs {
                    out.push('"');
                    for c in t.chars() {
                        if c == '"' || c == '\\' {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                    out.push('"');
                } else {
                    out.push_str(&t);
                }
            }
        }
        *index += 1;
    }
    out.push('}');
}

/// `"k"=>"v", "k2"=>NULL`.
pub(super) fn parse_hstore(text: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let mut cur = Cursor::new(text);
    let mut pairs = Vec::new();
    let read = |cur: &mut Cursor<'_>| -> Result<Option<String>, String> {
        cur.skip_ws();
        if cur.peek() == Some('"') {
            cur.next();
            let mut out = String::new();
            loop {
                match cur.next() {
                    Some('\\') => out.push(cur.next().ok_or("backslash at the end")?),
                    Some('"') => return Ok(Some(out)),
                    Some(c) => out.push(c),
                    None => return Err("unterminated quoted hstore string".into()),
                }
            }
        }
        let mut out = String::new();
        while let Some(c) = cur.peek() {
            if c == ',' || c == '=' || is_space(c) {
                break;
            }
            cur.next();
            out.push(c);
        }
        if out.eq_ignore_ascii_case("NULL") {
            Ok(None)
        } else {
            Ok(Some(out))
        }
    };
    loop {
        cur.skip_ws();
        if cur.peek().is_none() {
            break;
        }
        let key = read(&mut cur)?.ok_or("hstore key cannot be NULL")?;
        cur.skip_ws();
        cur.expect('=')?;
        cur.expect('>')?;
        let value = read(&mut cur)?;
        pairs.push((key, value));
        cur.skip_ws();
        match cur.next() {
            None => break,
            Some(',') => {}
            Some(c) => return Err(format!("expected ',' between hstore pairs, found {c:?}")),
        }
    }
    Ok(pairs)
}

pub(super) fn render_hstore(pairs: &[(String, Option<String>)], out: &mut String) {
    let quoted = |s: &str, out: &mut String| {
        out.push('"');
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    };
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        quoted(k, out);
        out.push_str("=>");
        match v {
            Some(v) => quoted(v, out),
            None => out.push_str("NULL"),
        }
    }
}

/// pgvector `[1,2.5,3]`.
pub(super) fn parse_vector(text: &str) -> Result<Vec<f32>, String> {
    let inner = text
        .trim()
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or("expected [x,y,…]")?;
    if inner.trim().is_empty() {
        return Ok(Vec::new());
    }
    inner
        .split(',')
        .map(|x| scalar::parse_float::<f32>(x.trim()))
        .collect()
}

/// pgvector prints each element with PostgreSQL's shortest float4 output.
pub(super) fn render_vector(v: &[f32], out: &mut String) {
    out.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        scalar::render_float4(*x, out);
    }
    out.push(']');
}
