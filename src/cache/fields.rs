//! Read access to a request's header fields for the cache's decisions about it: variant keys
//! (`vary`), the content codings a client takes, the cookies it keeps. The front door decides
//! on the fields as its parser left them, without building a `HeaderMap` for every hit;
//! pingora's path hands its `HeaderMap`. Parsing and storing fields is not this module's.

use http::{HeaderMap, HeaderValue};

/// A request's header fields, as the cache reads them.
pub trait RequestFields {
    /// The value of every field named `name` (matched case-insensitively), in the order the
    /// request sent them.
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]>;
}

impl RequestFields for HeaderMap {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }
}

impl<T: RequestFields + ?Sized> RequestFields for &T {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> {
        (**self).values(name)
    }
}
