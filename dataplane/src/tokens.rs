//! Rough token counts, for text whose tokens nobody counted: a request's
//! prompt (`openai`) and an answer whose provider reported no usage
//! (`metering`). A leaf, so that request inspection needs nothing of
//! metering.

/// The rough rule for text whose tokens nobody counted: about 4 bytes per
/// token (English prose with OpenAI's and Llama's tokenizers). Used only
/// where no provider reported usage; the reservation caps what it charges.
pub const ESTIMATED_BYTES_PER_TOKEN: u64 = 4;

/// Tokens in `bytes` of text by [`ESTIMATED_BYTES_PER_TOKEN`], rounded up.
pub fn estimated_tokens(bytes: u64) -> u64 {
    bytes.div_ceil(ESTIMATED_BYTES_PER_TOKEN)
}
