//! The protobuf codec of every generated service, client and server: prost's, with small
//! first buffers.
//!
//! tonic gives each call an encode and a decode buffer of 8 KiB to start with. On the
//! coordinator that is 16 KiB for each agent's session, which lasts as long as the agent
//! runs and mostly carries heartbeats of a few bytes — a third of what a connected host
//! costs. Here both buffers start at [`FIRST_BUFFER`]: a message that does not fit grows
//! its buffer to the message's size (the decoder reserves a message's whole length once
//! it has read its header; the encoder grows as prost writes), so large messages (a
//! desired state with many services, a deployment's story) still pass, and a buffer that
//! grew stays grown only on the calls that needed it.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Where each call's encode and decode buffers start, in bytes: a heartbeat or a report
/// of a few services fits.
pub const FIRST_BUFFER: usize = 1024;

/// How much encoded data is gathered before it is handed to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost's codec with buffers starting at [`FIRST_BUFFER`] (named in `build.rs` for the
/// generated code).
#[derive(Debug, Clone)]
pub struct SmallBuffers<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        SmallBuffers {
            _messages: PhantomData,
        }
    }
}

/// The buffer settings of every call.
fn settings() -> BufferSettings {
    BufferSettings::new(FIRST_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::coordinator_message::Msg;
    use crate::v1::{CoordinatorMessage, DesiredService, DesiredState, Heartbeat};
    use tonic::codec::{EncodeBody, SingleMessageCompressionOverride, Streaming};
    use tonic::codegen::tokio_stream;

    fn heartbeat(unix_ms: u64) -> CoordinatorMessage {
        CoordinatorMessage {
            msg: Some(Msg::Heartbeat(Heartbeat { unix_ms })),
        }
    }

    /// A desired state many times the first buffer, larger than the yield threshold too.
    fn large() -> CoordinatorMessage {
        let services = (0..2000)
            .map(|i| DesiredService {
                service: format!("service-{i:04}"),
                generation: i,
                ..Default::default()
            })
            .collect();
        CoordinatorMessage {
            msg: Some(Msg::Desired(DesiredState { services })),
        }
    }

    #[tokio::test]
    async fn messages_larger_than_the_first_buffer_cross_whole_between_small_ones() {
        use prost::Message;
        let sent = vec![heartbeat(1), large(), heartbeat(2), large(), heartbeat(3)];
        assert!(large().encoded_len() > YIELD_THRESHOLD);
        let mut codec = SmallBuffers::<CoordinatorMessage, CoordinatorMessage>::default();
        let body = EncodeBody::new_server(
            codec.encoder(),
            tokio_stream::iter(sent.clone().into_iter().map(Ok)),
            None,
            SingleMessageCompressionOverride::default(),
            None,
        );
        let mut received = Streaming::new_request(codec.decoder(), body, None, None);
        let mut got = Vec::new();
        while let Some(m) = received.message().await.unwrap() {
            got.push(m);
        }
        assert_eq!(got, sent);
    }
}
