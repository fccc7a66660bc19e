//! The protobuf codec for packmeter's services: prost's, except that a
//! request that does not parse is INVALID_ARGUMENT naming the message, not
//! INTERNAL, and that its buffers start small.
//!
//! The gRPC status-code guide files parse failures under INTERNAL, from the
//! library's point of view. For a gateway it is bad input like any other:
//! retrying the same bytes cannot succeed, and the caller should be told
//! which message was malformed.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    Status,
};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of each request's and response's buffer. tonic's default,
/// 8 KiB, is past glibc's per-thread cache, so every unary call paid two
/// trips into the general allocator (10% of server CPU at 1 M accounts, by
/// `perf`). packmeter's messages are a few dozen bytes; a batch grows its
/// buffer as it needs.
fn buffer() -> BufferSettings {
    BufferSettings::new(512, 32 * 1024)
}

#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        StrictCodec(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstDecoder::new(buffer()))
    }
}

#[derive(Debug)]
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            let name = std::any::type_name::<U>()
                .rsplit("::")
                .next()
                .unwrap_or("message");
            Status::invalid_argument(format!("malformed {name}: {}", s.message()))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
