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

/// Inside an `AsyncWrite` impl: `poll_write` and `poll_write_vectored` by calling `inner`, for
/// a wrapper that changes nothing written.
macro_rules! writes_to_inner {
    () => {
        fn poll_write(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            let inner = ::std::pin::Pin::new(&mut *self.inner);
            ::tokio::io::AsyncWrite::poll_write(inner, cx, buf)
        }

        fn poll_write_vectored(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            let inner = ::std::pin::Pin::new(&mut *self.inner);
            ::tokio::io::AsyncWrite::poll_write_vectored(inner, cx, bufs)
        }
    };
}

/// Implements `Ssl` for `$wrapper` by calling its `inner`: the TLS session, digest and ALPN
/// of the connection it wraps.
macro_rules! ssl_of_inner {
    ($wrapper:ty) => {
        impl ::pingora::protocols::Ssl for $wrapper {
            fn get_ssl(&self) -> Option<&::pingora::protocols::tls::TlsRef> {
                ::pingora::protocols::Ssl::get_ssl(&*self.inner)
            }

            fn get_ssl_digest(
                &self,
            ) -> Option<::std::sync::Arc<::pingora::protocols::tls::SslDigest>> {
                ::pingora::protocols::Ssl::get_ssl_digest(&*self.inner)
            }

            fn selected_alpn_proto(&self) -> Option<::pingora::protocols::ALPN> {
                ::pingora::protocols::Ssl::selected_alpn_proto(&*self.inner)
            }
        }
    };
}

pub(crate) use {
    delegate_all_but_read_to_inner, delegate_to_inner, flush_and_shutdown_to_inner, ssl_of_inner,
    writes_to_inner,
};
