//! Model prices and the cost of a response, in integer micro-USD.

use std::collections::HashMap;

use super::FieldError;

/// USD per million tokens, held as micro-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_micros_per_million: i64,
    pub output_micros_per_million: i64,
}

/// `prompt × input + completion × output` per million tokens, rounded up to a whole
/// micro-USD (a budget errs on the safe side by less than $0.000001 per response).
pub fn cost_micros(price: &Price, prompt: u64, completion: u64) -> i64 {
    let pico = (i128::from(prompt).saturating_mul(i128::from(price.input_micros_per_million)))
        .saturating_add(i128::from(completion).saturating_mul(i128::from(price.output_micros_per_million)));
    let micros = pico.saturating_add(999_999) / 1_000_000;
    i64::try_from(micros).unwrap_or(i64::MAX)
}

/// Model names: required, at most 200 characters, no spaces or control characters.
pub fn validate_model(field: &'static str, model: &str) -> Result<(), FieldError> {
    if model.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if model.len() > 200 || model.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FieldError::new(
            field,
            "must be a model name of at most 200 bytes without spaces or control characters",
        ));
    }
    Ok(())
}

/// Prices by model. A response's model matches a price exactly, or by the longest priced
/// name it extends with `-` (`gpt-4o-mini-2024-07-18` is priced as `gpt-4o-mini`).
#[derive(Debug, Default, Clone)]
pub struct PriceBook {
    prices: HashMap<String, Price>,
    /// The highest input and the highest output price of the book (of different models,
    /// maybe): what a request for an unpriced or unnamed model is reserved at.
    highest: Option<Price>,
}

impl PriceBook {
    pub fn new(prices: impl IntoIterator<Item = (String, Price)>) -> Self {
        let mut book = PriceBook { prices: prices.into_iter().collect(), highest: None };
        book.rank();
        book
    }

    pub fn set(&mut self, model: String, price: Price) {
        self.prices.insert(model, price);
        self.rank();
    }

    pub fn remove(&mut self, model: &str) {
        self.prices.remove(model);
        self.rank();
    }

    fn rank(&mut self) {
        self.highest = self.prices.values().copied().reduce(|a, b| Price {
            input_micros_per_million: a.input_micros_per_million.max(b.input_micros_per_million),
            output_micros_per_million: a.output_micros_per_million.max(b.output_micros_per_million),
        });
    }

    /// The highest input and output prices in the book; `None` when it is empty.
    pub fn highest(&self) -> Option<&Price> {
        self.highest.as_ref()
    }

    /// The price set for exactly this model.
    pub fn get(&self, model: &str) -> Option<&Price> {
        self.prices.get(model)
    }

    pub fn lookup(&self, model: &str) -> Option<&Price> {
        if let Some(p) = self.prices.get(model) {
            return Some(p);
        }
        let mut end = model.len();
        while let Some(i) = model[..end].rfind('-') {
            if let Some(p) = self.prices.get(&model[..i]) {
                return Some(p);
            }
            end = i;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: Price = Price { input_micros_per_million: 150_000, output_micros_per_million: 600_000 };

    #[test]
    fn cost_is_per_million_and_rounds_up() {
        // 1M prompt + 1M completion at $0.15/$0.60 = $0.75.
        assert_eq!(cost_micros(&MINI, 1_000_000, 1_000_000), 750_000);
        // 12 × 0.15 + 30 × 0.60 = 1.8 + 18 = 19.8 micro-USD -> 20.
        assert_eq!(cost_micros(&MINI, 12, 30), 20);
        assert_eq!(cost_micros(&MINI, 0, 0), 0);
        let big = Price { input_micros_per_million: i64::MAX, output_micros_per_million: i64::MAX };
        assert_eq!(cost_micros(&big, u64::MAX, u64::MAX), i64::MAX, "saturates, never wraps");
    }

    #[test]
    fn the_highest_prices_follow_changes() {
        let p = |i, o| Price { input_micros_per_million: i, output_micros_per_million: o };
        let mut book = PriceBook::default();
        assert_eq!(book.highest(), None);
        book.set("a".into(), p(5, 10));
        book.set("b".into(), p(7, 3));
        assert_eq!(book.highest(), Some(&p(7, 10)), "each the highest of any model");
        book.remove("a");
        assert_eq!(book.highest(), Some(&p(7, 3)));
        assert_eq!(PriceBook::new([("c".to_string(), p(1, 2))]).highest(), Some(&p(1, 2)));
    }

    #[test]
    fn dated_model_names_find_their_base_price() {
        let book = PriceBook::new([("gpt-4o-mini".to_string(), MINI)]);
        assert_eq!(book.lookup("gpt-4o-mini"), Some(&MINI));
        assert_eq!(book.lookup("gpt-4o-mini-2024-07-18"), Some(&MINI));
        assert_eq!(book.lookup("gpt-4o"), None);
        assert_eq!(book.lookup("gpt-4o-minimal"), None);
    }

    #[test]
    fn model_names() {
        assert!(validate_model("model", "claude-3-5-sonnet-latest").is_ok());
        assert_eq!(validate_model("model", "").unwrap_err().field, "model");
        assert_eq!(validate_model("model", "a b").unwrap_err().field, "model");
    }
}
