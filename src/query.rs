//! The IncidentQuery core: listings with signed page tokens over the storage
//! core's reads.
use chrono::Utc;

use crate::{
    domain::{ActionStats, Incident, IncidentFilter, IncidentKey, IncidentOrder, Page, StoredEvent, TimelineQuery},
    error::CoreError,
    pagination::{Continuation, Listing, PageTokens},
    storage::Storage,
};

pub const PAGE_TOKEN_FIELD: &str = "page_token";

pub struct IncidentQueries {
    storage: Storage,
    tokens: PageTokens,
}

/// A page as callers see it: items and the token of the next page, if any.
pub struct TokenPage<T> {
    pub items: Vec<T>,
    pub next_page_token: Option<String>,
}

impl IncidentQueries {
    pub fn new(storage: Storage, tokens: PageTokens) -> Self {
        IncidentQueries { storage, tokens }
    }

    fn continuation(&self, token: &str, listing: Listing, params: &str) -> Result<Option<Continuation>, CoreError> {
        if token.is_empty() {
            return Ok(None);
        }
        self.tokens
            .open(PAGE_TOKEN_FIELD, token, listing, params, Utc::now())
            .map(Some)
    }

    fn next_token<T>(
        &self,
        page: Page<T>,
        listing: Listing,
        params: &str,
        started: chrono::DateTime<Utc>,
    ) -> TokenPage<T> {
        let next_page_token = page.next.and_then(|next| {
            next.after
                .map(|after| self.tokens.issue(listing, params, started, &next.snapshot, after))
        });
        TokenPage {
            items: page.items,
            next_page_token,
        }
    }

    pub async fn list_incidents(
        &self,
        filter: &IncidentFilter,
        order: IncidentOrder,
        page_size: usize,
        page_token: &str,
    ) -> Result<TokenPage<Incident>, CoreError> {
        let params = PageTokens::fingerprint(&(filter, order));
        let continuation = self.continuation(page_token, Listing::Incidents, &params)?;
        let started = continuation.as_ref().map_or_else(Utc::now, |c| c.started);
        let page = self
            .storage
            .list_incidents(filter, order, page_size, continuation.map(|c| c.position))
            .await?;
        Ok(self.next_token(page, Listing::Incidents, &params, started))
    }

    pub async fn get_incident(&self, key: &IncidentKey) -> Result<Incident, CoreError> {
        self.storage.get_incident(key).await
    }

    pub async fn list_audit_events(
        &self,
        query: &TimelineQuery,
        page_size: usize,
        page_token: &str,
    ) -> Result<TokenPage<StoredEvent>, CoreError> {
        let params = PageTokens::fingerprint(query);
        let continuation = self.continuation(page_token, Listing::AuditEvents, &params)?;
        let started = continuation.as_ref().map_or_else(Utc::now, |c| c.started);
        let page = self
            .storage
            .list_audit_events(query, page_size, continuation.and_then(|c| c.position.after))
            .await?;
        Ok(self.next_token(page, Listing::AuditEvents, &params, started))
    }

    pub async fn action_stats(&self, filter: &IncidentFilter) -> Result<Vec<ActionStats>, CoreError> {
        self.storage.action_stats(filter).await
    }
}
