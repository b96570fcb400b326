//! The protobuf codec of every generated service and client: prost's, except
//! that a request whose bytes do not decode (invalid UTF-8 in a string, a
//! truncated message, nesting past prost's recursion limit) is the caller's
//! error, INVALID_ARGUMENT. tonic-prost answers INTERNAL, following the gRPC
//! library's table, which makes a client's bad bytes look like a server fault
//! in metrics, traces and logs.
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    Status,
};
use tonic_prost::{prost::Message, ProstCodec, ProstDecoder, ProstEncoder};

pub struct ProtoCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        ProtoCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RefuseUndecodable<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RefuseUndecodable(self.0.decoder())
    }
}

pub struct RefuseUndecodable<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for RefuseUndecodable<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            // prost's own message names the byte problem, never the content.
            Status::invalid_argument(format!("the message does not decode: {}", status.message()))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
