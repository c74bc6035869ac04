//! The pingora stream traits a connection wrapper passes straight to the connection it wraps
//! (its `inner` field, a boxed stream): reading, shutting down, and the identity and digests
//! pingora's sessions ask for. Each wrapper writes the rest itself: what it changes (counting
//! writes, `proxy::progress`; a TLS digest, `proxy::proxy_protocol`) and `AsyncWrite`'s
//! writes.

/// Implements `AsyncRead`, `Shutdown`, `UniqueID`, `GetTimingDigest`, `GetProxyDigest` and
/// `GetSocketDigest` for `$wrapper` by calling its `inner`.
macro_rules! delegate_to_inner {
    ($wrapper:ty) => {
        impl ::tokio::io::AsyncRead for $wrapper {
            fn poll_read(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &mut ::tokio::io::ReadBuf<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf)
            }
        }

        $crate::proxy::delegate::delegate_all_but_read_to_inner!($wrapper);
    };
}

/// [`delegate_to_inner`] but `AsyncRead`, for a wrapper that changes what is read.
macro_rules! delegate_all_but_read_to_inner {
    ($wrapper:ty) => {
        #[::async_trait::async_trait]
        impl ::pingora::protocols::Shutdown for $wrapper {
            async fn shutdown(&mut self) {
                ::pingora::protocols::Shutdown::shutdown(&mut *self.inner).await;
            }
        }

        impl ::pingora::protocols::UniqueID for $wrapper {
            fn id(&self) -> ::pingora::protocols::UniqueIDType {
                self.inner.id()
            }
        }

        impl ::pingora::protocols::GetTimingDigest for $wrapper {
            fn get_timing_digest(&self) -> Vec<Option<::pingora::protocols::TimingDigest>> {
                self.inner.get_timing_digest()
            }
        }

        impl ::pingora::protocols::GetProxyDigest for $wrapper {
            fn get_proxy_digest(
                &self,
            ) -> Option<::std::sync::Arc<::pingora::protocols::raw_connect::ProxyDigest>> {
                self.inner.get_proxy_digest()
            }
        }

        impl ::pingora::protocols::GetSocketDigest for $wrapper {
            fn get_socket_digest(
                &self,
            ) -> Option<::std::sync::Arc<::pingora::protocols::SocketDigest>> {
                self.inner.get_socket_digest()
            }
        }
    };
}

/// Inside an `AsyncWrite` impl: `is_write_vectored`, `poll_flush` and `poll_shutdown` by
/// calling `inner`, for a wrapper that writes `poll_write` and `poll_write_vectored` itself.
macro_rules! flush_and_shutdown_to_inner {
    () => {
        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
        }
    };
}

pub(crate) use {delegate_all_but_read_to_inner, delegate_to_inner, flush_and_shutdown_to_inner};
