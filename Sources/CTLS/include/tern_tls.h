// OpenSSL's libssl (Debian: libssl-dev) for the migration channels' TLS. The functions below
// stand in for OpenSSL's macros, which Swift cannot call, and for the few steps that need
// OpenSSL's C-only flag sets; the handshake and the I/O loops are Swift (Migration/TLS).
#ifndef TERN_TLS_H
#define TERN_TLS_H

#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stddef.h>

/// A context's common settings: TLS 1.2 as the oldest version (QEMU's GnuTLS default allows no
/// older), no renegotiation, no session tickets (a migration connects once), a peer's EOF
/// without close_notify read as an end of stream (the migration stream has its own END
/// record), and no passphrase prompt on the terminal for an encrypted key.
int tern_tls_configure_context(SSL_CTX *context);

/// Partial writes (a write returns after each record it got out) and a retry from a moved buffer.
void tern_tls_set_partial_writes(SSL *ssl);

/// The server name sent in the ClientHello (SNI); not for IP addresses.
int tern_tls_set_server_name(SSL *ssl, const char *name);

/// Adds a CRL file to the context's store and turns on CRL checking of the peer's certificate.
/// Returns 0, or -1 when the file cannot be read or parsed.
int tern_tls_load_crl(SSL_CTX *context, const char *path);

/// The subject of the peer's certificate (`peer` non-zero) or of this side's own, in RFC 4514
/// form ("CN=client,O=Example,C=GB") as GnuTLS (and so QEMU's authz-simple) writes it.
/// Returns the length, or -1 without a certificate.
int tern_tls_subject(SSL *ssl, int peer, char *buffer, size_t capacity);

/// Pops the oldest error on this thread's OpenSSL queue as text ("" when empty) and clears
/// the rest.
void tern_tls_take_error(char *buffer, size_t capacity);

#endif
