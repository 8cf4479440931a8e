/*
 * warren_plugin.h: the C ABI of warren's native channel-handler plugins, version 1.
 *
 * A native plugin is a shared library (.so, .dylib, .dll) that a line listener loads as its
 * channel handler (docs/plugins.md, "Native plugins"; the line protocol: docs/protocols/line.md).
 * It exports the functions declared at the end of this file with C linkage. warren calls them
 * from one thread per plugin, one call at a time; the host functions in WarrenHost may be called
 * from any thread.
 *
 * A plugin that reports another ABI version is refused when it is loaded.
 */
#ifndef WARREN_PLUGIN_H
#define WARREN_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes: what warren_plugin_abi_version() must return. */
#define WARREN_PLUGIN_ABI_VERSION 1u

/*
 * One client connection. Opaque: only its address is handed out. A handle is valid from
 * warren_handle_connect (or, with lazy channels or after a reload, the first warren_handle_msg
 * that carries it) until warren_handle_broken returns; the same connection keeps the same handle,
 * across reloads too.
 */
typedef struct WarrenChannel WarrenChannel;

/* The host's functions, handed to warren_plugin_init. The table lives as long as the process. */
typedef struct WarrenHost {
    /* The ABI version the host speaks (first field, so that it can always be read). */
    uint32_t abi_version;
    /* Queue `len` bytes at `data` for the client, framed "<len> \r\n<data>". Returns 0 when
     * queued, -1 when the channel is closed (or its client cannot keep up). The bytes are copied
     * before it returns. */
    int32_t (*send)(WarrenChannel *ch, const uint8_t *data, size_t len);
    /* Close the connection once what is queued has been written. */
    void (*close)(WarrenChannel *ch);
    /* Attach a pointer to the channel (a user id after authentication, a session struct...).
     * The host never reads or frees it; it survives reloads, so point at heap memory. */
    void (*set_data)(WarrenChannel *ch, void *data);
    /* What set_data attached, or NULL. */
    void *(*get_data)(WarrenChannel *ch);
    /* The channel's id: unique for the life of the process, never reused, below 2^53. */
    uint64_t (*channel_id)(WarrenChannel *ch);
} WarrenHost;

/* Functions the plugin exports. */

/* Required: return WARREN_PLUGIN_ABI_VERSION. */
uint32_t warren_plugin_abi_version(void);

/* Required: called once after loading, before any other call. Keep `host` to send later.
 * Return 0 to start; anything else refuses the load (the running version, if any, stays). */
int32_t warren_plugin_init(const WarrenHost *host);

/* Optional: a client connected. Not called with lazy channels. */
int32_t warren_handle_connect(WarrenChannel *ch);

/* Required: a message arrived; `data` is valid only during the call. */
int32_t warren_handle_msg(WarrenChannel *ch, const uint8_t *data, size_t len);

/* Required: the connection closed; `send` is refused from here on, and the handle is freed when
 * this returns. */
int32_t warren_handle_broken(WarrenChannel *ch);

/* Optional: called before the library is unloaded (at shutdown, or once a reload has replaced
 * this version and no connection uses it any more). */
void warren_plugin_stop(void);

/* Nonzero returns from the handle functions are logged; the connection stays. */

#ifdef __cplusplus
}
#endif

#endif /* WARREN_PLUGIN_H */
