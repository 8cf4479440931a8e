/*
 * A native channel-handler plugin in C: answers every message with "oh nice", as ffown's
 * example plugin did, and counts each connection's messages through set_data/get_data.
 *
 *   cc -shared -fPIC -I include -o libecho_c.so examples/plugins/echo_c/echo.c
 *
 * then give libecho_c.so to a line listener as its plugin.
 *
 * See docs/plugins.md ("Native plugins") and include/warren_plugin.h.
 */
#include <stdlib.h>

#include "warren_plugin.h"

static const WarrenHost *host;

uint32_t warren_plugin_abi_version(void) { return WARREN_PLUGIN_ABI_VERSION; }

int32_t warren_plugin_init(const WarrenHost *h) {
    host = h;
    return 0;
}

int32_t warren_handle_connect(WarrenChannel *ch) {
    uint64_t *count = calloc(1, sizeof *count);
    if (count == NULL) return -1;
    host->set_data(ch, count);
    return 0;
}

int32_t warren_handle_msg(WarrenChannel *ch, const uint8_t *data, size_t len) {
    (void)data;
    (void)len;
    uint64_t *count = host->get_data(ch);
    if (count != NULL) *count += 1;
    static const char reply[] = "oh nice";
    return host->send(ch, (const uint8_t *)reply, sizeof reply - 1);
}

int32_t warren_handle_broken(WarrenChannel *ch) {
    free(host->get_data(ch));
    host->set_data(ch, NULL);
    return 0;
}
