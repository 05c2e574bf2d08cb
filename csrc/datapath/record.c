/* The store's record log as C writes it: the COPY record of a first copy C installs.
 *
 * Framing as snapimg/engine/records.py (the format is docs/store-format.md): every
 * record is ``u32 length | u8 kind | payload | u32 crc32``, little endian, the length
 * counting the whole record and the CRC-32 (zlib's) covering everything before it.  A
 * COPY (kind 5) payload is ``<HIQIQ``: origin, generation, block, count, slot.
 */
#include "datapath.h"

#include <string.h>

#define KIND_COPY 5

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_of(const unsigned char *p, size_t n)
{
    pthread_once(&crc_once, crc_init);
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static unsigned char *le(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        *p++ = (unsigned char)(v >> (8 * i));
    return p;
}

void encode_copy_record(char *out, uint16_t origin, uint32_t gen, uint64_t block,
                        uint32_t count, uint64_t slot)
{
    unsigned char *p = (unsigned char *)out;
    p = le(p, COPY_RECORD_SIZE, 4);
    *p++ = KIND_COPY;
    p = le(p, origin, 2);
    p = le(p, gen, 4);
    p = le(p, block, 8);
    p = le(p, count, 4);
    p = le(p, slot, 8);
    le(p, crc32_of((const unsigned char *)out, COPY_RECORD_SIZE - 4), 4);
}
