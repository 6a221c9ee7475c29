//! SIP signalling: sans-IO message handling, transactions, dialogs and SDP, plus thin tokio transports.
